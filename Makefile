# Two commands for a newcomer: `make demo` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
LCS := $(VENV)/bin/lcs
# The Colin27/AAL templates (Debian's mricron-data); LCS_TEMPLATES=/folder/holding/them uses a copy elsewhere.
TEMPLATES := $(or $(LCS_TEMPLATES),/usr/share/mricron/templates)
MRICRON := $(TEMPLATES)/aal.nii.gz
DEMO_OUT ?= demo-output
# Which checkpoint of build/demo-model becomes the demo: best (by validation Dice) or last.
KEEP ?= best

.PHONY: demo test test-slow env data demo-model benchmark evaluate clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[train,demo,test,workflow,evaluate]"
	touch $@

env: $(VENV)/.installed

# Real anatomy for tests, training and evaluation: Colin27 + AAL from Debian's mricron-data.
data: $(MRICRON)
$(MRICRON):
	@if [ -n "$(LCS_TEMPLATES)" ]; then echo "LCS_TEMPLATES=$(LCS_TEMPLATES) holds no aal.nii.gz: copy the Colin27/AAL templates of Debian's mricron-data there, or unset LCS_TEMPLATES" >&2; exit 1; fi
	@if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then echo "the Colin27/AAL templates are missing ($(MRICRON)): install them as root (sudo apt-get install mricron-data), or set LCS_TEMPLATES to a folder that holds them" >&2; exit 1; fi
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mricron-data >/dev/null

# Segment a real brain that is not the atlas (nilearn's MNI152 2009 template) with the bundled model.
demo: data env
	$(PY) -m lcs_training.demo $(DEMO_OUT)
	@echo "The lcs command is $(LCS); 'source $(VENV)/bin/activate' puts it on your PATH (try: lcs labels)."

# The fast tier (a few minutes; tiny models kept in Testing/models) and the slow tier (training from scratch,
# experiments at tiny scale, torchrun). CI runs both. Testing/make_test_models.py re-creates the tiny models.
# The fast tier runs on every core (pytest-xdist), one torch thread per worker: 13 % faster on 2 cores than one process.
test: data env
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto -m "not slow" Testing

test-slow: data env
	$(PY) -m pytest -q -m slow Testing

# Re-create Resources/Models/demo.lcs (80 training minutes on a 2-core CPU, about 90 with validation). EXTRA passes more options, e.g.
#   make demo-model EXTRA=--resume                              continue an interrupted run (build/demo-model/state.pt)
#   make demo-model EXTRA="--init Resources/Models/demo.lcs --overwrite"   continue training the committed model
demo-model: env data
	$(LCS) demo-data build/colin27
	$(LCS) train build/colin27 --atlas colin27 -o build/demo-model --condition-levels all --prior-weight 6 --prior-radius 4 \
	  --lr 1e-3 --labels-per-subject 4 --deformable-share 0.5 --subject-reuse 4 --steps 100000 --minutes $${MINUTES:-80} --validate-every 100 \
	  --validation-subjects 3 --seed 3 --name "Colin27 AAL demo (116 labels, 2 mm)" $(EXTRA)
	cp build/demo-model/$(KEEP).lcs Resources/Models/demo.lcs

benchmark: env data
	$(LCS) benchmark

evaluate: env data
	$(LCS) evaluate --out build/evaluate

clean:
	rm -rf $(VENV) build $(DEMO_OUT)
