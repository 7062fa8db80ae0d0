# The HPSv3 Python environment, layered on the main venv (see docs/hps.md).
#
#   make -f infra/hps-env.mk HPS_VENV=.hps-venv MAIN_VENV=.venv
#
# hpsv3 1.0.0 pins transformers==4.45.2, which cannot share the main venv (transformers 5).
# HPS_VENV is a venv of the same base Python whose own site-packages holds only the pinned
# packages of infra/hps-requirements.txt (installed with --no-deps); a .pth file then appends
# the main venv's site-packages AFTER its own, so torch, numpy, ray and storymem itself come
# from the main venv (one torch on disk) while transformers 4.45.2, tokenizers 0.20,
# huggingface_hub 0.36 and diffusers 0.36.0 shadow the main venv's newer copies.
# The venv has no pip or setuptools of its own (the main venv's pip installs into it with
# --python), so nothing but the pinned packages shadows the main venv. The pins are installed
# before the .pth exists, so pip never sees (or touches) the main venv's packages.
# trl 0.12.2's wheel ships its own test suite as a top-level package named `tests`; it is
# deleted so that name cannot shadow anything (trl never imports it).
# Idempotent: a stamp file records a finished, checked build; a change of the requirements
# or of this file rebuilds from scratch.
HPS_VENV ?= .hps-venv
MAIN_VENV ?= .venv
HPS_REQUIREMENTS ?= infra/hps-requirements.txt
HPS_PY := $(HPS_VENV)/bin/python
HPS_STAMP := $(HPS_VENV)/.installed
LAYER_PTH := zz_storymem_main_venv.pth

.PHONY: all check clean
all: $(HPS_STAMP)

$(HPS_STAMP): $(HPS_REQUIREMENTS) infra/hps-env.mk | $(MAIN_VENV)/bin/python
	@echo "building the HPSv3 environment in $(HPS_VENV) (layered on $(MAIN_VENV))"
	@start=$$(date +%s); set -e; \
	rm -rf $(HPS_VENV); \
	$(MAIN_VENV)/bin/python -m venv --without-pip $(HPS_VENV); \
	$(MAIN_VENV)/bin/python -m pip --python $(HPS_PY) install -q --disable-pip-version-check \
	  --no-deps -r $(HPS_REQUIREMENTS); \
	main_site=$$($(MAIN_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	hps_site=$$($(HPS_PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	rm -rf $$hps_site/tests; \
	echo "import site; site.addsitedir('$$main_site')" > $$hps_site/$(LAYER_PTH); \
	HF_HUB_OFFLINE=1 $(HPS_PY) -m storymem_model.scorers.hps_env_check "$$main_site"; \
	echo "HPSv3 environment ready in $$(( $$(date +%s) - start )) s"
	@touch $@

$(MAIN_VENV)/bin/python:
	@echo "main venv $(MAIN_VENV) not found: run 'make install' first" >&2; exit 1

# Re-run the import/version check on an existing environment.
check: | $(HPS_STAMP)
	HF_HUB_OFFLINE=1 $(HPS_PY) -m storymem_model.scorers.hps_env_check \
	  "$$($(MAIN_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"

clean:
	rm -rf $(HPS_VENV)
