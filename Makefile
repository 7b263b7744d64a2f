# Two commands for a newcomer: `make demo` and `make test`. Both install into ./.venv.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
export HF_HUB_OFFLINE := 1

.PHONY: demo serve ask test reliability bench venv clean

$(VENV)/.installed: pyproject.toml
	@test -n "$(PY)" || (echo "need Python 3.11+ (python3.11 or python3)"; exit 1)
	[ -x $(VENV)/bin/python ] || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test,onnx]'
	touch $@

venv: $(VENV)/.installed

demo: venv            ## build, train, serve and ask: the whole lifecycle, offline
	$(VENV)/bin/twinq demo

serve: venv           ## the demo, left running with its status page
	$(VENV)/bin/twinq demo --serve

ask: venv            ## make ask Q="how do I get a refund?" [URL=redis://...] (a worker must run)
	$(VENV)/bin/twinq ask $(if $(URL),--redis-url '$(URL)') "$(Q)"

test:                 ## the same command CI runs
	bash .ci/run

reliability: venv     ## the long fault and load suites
	$(VENV)/bin/python -m pytest -q -s --run-reliability tests/reliability

clean:
	rm -rf $(VENV) runs .pytest_cache
