# Two commands for a newcomer: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
LCS := $(VENV)/bin/lcs
MRICRON := /usr/share/mricron/templates/aal.nii.gz
DEMO_OUT ?= demo-output
# Which checkpoint of build/demo-model becomes the demo: best (by validation Dice) or last.
KEEP ?= best

.PHONY: demo test env data demo-model benchmark evaluate clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[train,demo,test]"
	touch $@

env: $(VENV)/.installed

# Real anatomy for tests, training and evaluation: Colin27 + AAL from Debian's mricron-data.
data: $(MRICRON)
$(MRICRON):
	@command -v apt-get >/dev/null || { echo "install Debian's mricron-data (Colin27 + AAL atlases) or copy its templates to /usr/share/mricron/templates"; exit 1; }
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mricron-data >/dev/null

# Segment a real brain that is not the atlas (nilearn's MNI152 2009 template) with the bundled model.
demo: env data
	$(PY) -m lcs_training.demo $(DEMO_OUT)

test: env data
	$(PY) -m pytest -q Testing

# Re-create Resources/Models/demo.lcs (hours on a 2-core CPU). EXTRA passes more options, e.g.
#   make demo-model EXTRA=--resume                              continue an interrupted run (build/demo-model/state.pt)
#   make demo-model EXTRA="--init Resources/Models/demo.lcs"    continue training the committed model
demo-model: env data
	$(LCS) demo-data build/colin27
	$(LCS) train build/colin27 --atlas colin27 -o build/demo-model --condition-levels all --lr 1e-3 \
	  --steps 100000 --minutes $${MINUTES:-110} --validate-every 250 --validation-subjects 2 \
	  --name "Colin27 AAL demo (116 labels, 2 mm)" $(EXTRA)
	cp build/demo-model/$(KEEP).lcs Resources/Models/demo.lcs

benchmark: env data
	$(LCS) benchmark

evaluate: env data
	$(LCS) evaluate --out build/evaluate

clean:
	rm -rf $(VENV) build $(DEMO_OUT)
