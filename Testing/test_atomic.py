"""Nothing lost: every output goes through files.atomic_path (a temporary file renamed into place), so a failed write
keeps the old file, and a training run killed at any instant, even while saving, resumes cleanly."""
import ast
import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from LabelConditionedSegLib.checkpoint import Checkpoint
from LabelConditionedSegLib.errors import Cancelled
from LabelConditionedSegLib.cli import main
from LabelConditionedSegLib.files import PARTIAL, atomic_path, remove_leftovers
from LabelConditionedSegLib.model import ModelConfig
from lcs_training.train import TrainSettings, _holding_ctrl_c, train

from conftest import TINY_LABELS

REPO = Path(__file__).resolve().parents[1]


def _partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if PARTIAL.match(p.name))


def _dead_pid() -> int:
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


# ---- every writer goes through files.py --------------------------------------------------------------------------
# Writes that are not outputs, by (file, enclosing function): each says why it needs no atomic replace.
NOT_OUTPUTS = {
    ("Training/lcs_training/benchmark.py", "make_head"): "a scratch scan in a TemporaryDirectory, read by the timed workers",
    ("Training/lcs_training/experiment.py", "_start_peak"): "/proc/self/clear_refs: a command to the kernel, not a file",
}
HELPER = "LabelConditionedSeg/LabelConditionedSegLib/files.py"  # the one place that writes and renames
WRITING_METHODS = {"WriteImage", "ImageFileWriter", "savefig", "write_text", "write_bytes", "to_csv", "to_filename",
                   "savetxt", "savez", "savez_compressed"}
MODULE_WRITERS = {("torch", "save"), ("np", "save"), ("numpy", "save"), ("json", "dump"), ("pickle", "dump"),
                  ("shutil", "copy"), ("shutil", "copy2"), ("shutil", "copyfile"), ("shutil", "copytree"),
                  ("shutil", "move"), ("os", "replace"), ("os", "rename")}  # os.replace/rename: a second rename dance


def _writes(call: ast.Call) -> bool:
    """Whether a call writes (or renames into place) a file."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
    if (owner, name) in MODULE_WRITERS:
        return True
    if name in WRITING_METHODS:  # a method (not files.write_text and the like), or a bare sitk function
        return owner != "files" if isinstance(func, ast.Attribute) else name in ("WriteImage", "ImageFileWriter")
    if name != "open":
        return False
    if owner == "os":  # os.open: writes a file only when it creates, truncates or appends to one
        return any(flag in ast.dump(call) for flag in ("O_CREAT", "O_TRUNC", "O_APPEND"))
    path_first = isinstance(func, ast.Name) or owner in ("io", "gzip", "bz2", "lzma", "codecs")  # else Path.open(mode)
    modes = [k.value for k in call.keywords if k.arg == "mode"] or call.args[1 if path_first else 0:][:1]
    if not modes:
        return False  # read
    mode = modes[0]
    return not (isinstance(mode, ast.Constant) and isinstance(mode.value, str)) or any(c in mode.value for c in "wax+")


def _names(node: ast.expr) -> set[str]:
    """The names a path argument is made from: `temporary`, `str(temporary)`, `Path(temporary)`, `os.fspath(temporary)`."""
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("str", "Path", "fspath"):
        return set().union(*(_names(a) for a in node.args)) if node.args else set()
    return set()


def direct_writes(source: str, filename: str = "<snippet>") -> list[tuple[int, str]]:
    """(line, enclosing function) of each file write that does not target the temporary path of an enclosing
    `with atomic_path(...) as temporary:` block."""
    tree = ast.parse(source, filename)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call) and _writes(n)):
        targets = set().union(*(_names(a) for a in [*call.args, *(k.value for k in call.keywords)]))
        if isinstance(call.func, ast.Attribute):
            targets |= _names(call.func.value)  # temporary.write_text(...)
        temporaries, function, node = set(), "<module>", call
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.With, ast.AsyncWith)):
                temporaries |= {item.optional_vars.id for item in node.items
                                if isinstance(item.context_expr, ast.Call) and isinstance(item.optional_vars, ast.Name)
                                and getattr(item.context_expr.func, "attr", getattr(item.context_expr.func, "id", "")) == "atomic_path"}
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and function == "<module>":
                function = node.name
        if not targets & temporaries:
            found.append((call.lineno, function))
    return sorted(found)


def test_every_file_the_package_writes_goes_through_files_py():
    """sitk.WriteImage, torch.save, savefig, open(..., "w"), write_text, ... only on the temporary path of
    files.atomic_path (or through write_image/write_text/write_csv): cli.py included; files.py is the helper."""
    offenders = []
    for path in sorted([*REPO.glob("LabelConditionedSeg/**/*.py"), *REPO.glob("Training/**/*.py")]):
        relative = path.relative_to(REPO).as_posix()
        if relative == HELPER:
            continue
        for line, function in direct_writes(path.read_text(encoding="utf-8"), relative):
            if (relative, function) not in NOT_OUTPUTS:
                offenders.append(f"{relative}:{line} (in {function})")
    assert not offenders, f"files written directly, not through LabelConditionedSegLib.files: {offenders}"


def test_the_scan_tells_direct_writes_from_atomic_ones():
    snippet = """
import shutil, torch, os, SimpleITK as sitk
from LabelConditionedSegLib.files import atomic_path
def bad(image, path, fig, model):
    sitk.WriteImage(image, str(path))
    torch.save(model, path)
    fig.savefig(path)
    open(path, "w").write("x")
    path.write_text("x")
    with open(path, mode="a") as f: pass
    with path.open("wb") as f: pass
    shutil.copy(path, path)
    os.replace(path, path)
    os.open(path, os.O_WRONLY | os.O_CREAT)
def good(image, path, fig, model, other):
    with atomic_path(path) as temporary:
        sitk.WriteImage(image, str(temporary))
        torch.save(model, temporary)
        fig.savefig(temporary)
        temporary.write_text("x")
        with open(temporary, "w") as f: pass
        open(other, "w")
    open(path)
    open(path, "rb")
    path.open()
    os.open(os.devnull, os.O_WRONLY)
"""
    assert direct_writes(snippet) == [(n, "bad") for n in range(5, 15)] + [(22, "good")]


# ---- a failed write keeps the old file -------------------------------------------------------------------------------
# Each writer writes an old file, then, in this process, under a file size limit of half the new file (RLIMIT_FSIZE: the
# kernel fails the write with EFBIG, as a full disk fails it with ENOSPC), tries to replace it.
FULL_DISK = r"""
import json, resource, shutil, signal, sys
from pathlib import Path
import numpy as np
import SimpleITK as sitk
from LabelConditionedSegLib.checkpoint import Checkpoint
from LabelConditionedSegLib.engine import Condition
from LabelConditionedSegLib.files import write_image
from LabelConditionedSegLib.geometry import Box
from LabelConditionedSegLib.outputs import write_overlay_png, write_seg_nrrd, write_volumes_csv
from LabelConditionedSegLib.pipeline import Segmentation
from LabelConditionedSegLib.training_folder import write_case

data, model, out = (Path(a) for a in sys.argv[1:4])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing us
image, labels = (sitk.ReadImage(str(data / sub / "colin27.nii.gz")) for sub in ("images", "labels"))
array = sitk.GetArrayFromImage(labels)
checkpoint = Checkpoint.load(model)

def segmentation(values):
    conditions = [Condition.of(f"label {v}", v, array == v, (200, 40, 40)) for v in values]
    return Segmentation(conditions, labels, [Box.of(array == v) for v in values], lambda box: box, [1.0] * len(values))

def renamed(name):
    checkpoint.provenance["name"] = name
    return checkpoint

def relabeled(value):
    changed = sitk.GetImageFromArray(np.where(array == 3, value, array).astype(np.int16))
    changed.CopyInformation(labels)
    return changed

writers = {  # name: (file, write(version, path)), version 0 (old) or 1 (new)
    "write_seg_nrrd": ("a.seg.nrrd", lambda v, p: write_seg_nrrd(segmentation([3, 4, 85][:2 + v]), p)),
    "write_volumes_csv": ("a.csv", lambda v, p: write_volumes_csv(segmentation([3, 4, 85][:2 + v]), p)),
    "write_overlay_png": ("a.png", lambda v, p: write_overlay_png(image, labels, segmentation([3, 4, 85][:2 + v]).conditions, p)),
    "Checkpoint.save": ("a.lcs", lambda v, p: renamed(f"version {v}").save(p)),
    "write_image": ("a.nii.gz", lambda v, p: write_image(relabeled(3 + v), p, compress=False)),
    "write_case": ("images/a.nii.gz", lambda v, p: write_case(p.parents[1], "a", relabeled(3 + v), labels)),
}
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
report = {}
for name, (file, write) in writers.items():
    old, new, scratch = out / "old" / file, out / "dest" / file, out / "scratch" / file
    for path in (old, new, scratch):
        path.parent.mkdir(parents=True, exist_ok=True)
    write(0, new)
    shutil.copyfile(new, old)
    write(1, scratch)  # the new file, written without a limit: its size
    resource.setrlimit(resource.RLIMIT_FSIZE, (scratch.stat().st_size // 2, hard))
    try:
        write(1, new)
        error = None
    except Exception as failure:
        error = f"{type(failure).__name__}: {str(failure).strip().splitlines()[-1][:200] if str(failure).strip() else ''}"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    report[name] = {"file": file, "error": error, "new_size": scratch.stat().st_size}
print(json.dumps(report))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temporary(colin27_2mm, tiny_checkpoint, tmp_path):
    """A real failure of the file system half way through each writer (the new file larger than the limit): the writer
    raises, the old output is there byte for byte, and no temporary file is left. Colin27 at 2 mm: the same writes,
    an eighth of the bytes."""
    data = tmp_path / "colin27"
    for sub, image in (("images", colin27_2mm[0]), ("labels", colin27_2mm[1])):
        (data / sub).mkdir(parents=True)
        sitk.WriteImage(image, str(data / sub / "colin27.nii.gz"))
    run = subprocess.run([sys.executable, "-c", FULL_DISK, str(data), str(tiny_checkpoint), str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(report) == 6
    for name, result in report.items():
        old, kept, new = (tmp_path / sub / result["file"] for sub in ("old", "dest", "scratch"))
        assert result["error"], f"{name} wrote half a file without an error"  # ITK's NIfTI writer needs files.py's check
        assert kept.read_bytes() == old.read_bytes(), name
        assert new.read_bytes() != old.read_bytes(), name  # the failed write would have changed it
        assert not _partials(kept.parent), name
    assert "File too large" in report["write_volumes_csv"]["error"]
    assert "short" in report["write_image"]["error"]  # ITK's NIfTI writer itself reports nothing


def test_atomic_path_keeps_the_suffixes_and_removes_its_temporary_on_failure(tmp_path):
    target = tmp_path / "scan.seg.nrrd"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_path(target) as temporary:
            assert temporary.parent == tmp_path and temporary.name.endswith(".partial.seg.nrrd")
            assert PARTIAL.match(temporary.name)
            temporary.write_text("half")
            raise ValueError("the writer failed")
    assert target.read_text(encoding="utf-8") == "old" and _partials(tmp_path) == []
    with atomic_path(target) as temporary:
        temporary.write_text("new")
    assert target.read_text(encoding="utf-8") == "new" and _partials(tmp_path) == []
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    with atomic_path(link) as temporary:
        temporary.write_text("through the link")
    assert link.is_symlink() and target.read_text(encoding="utf-8") == "through the link"


def test_leftovers_of_dead_processes_are_removed_and_those_of_live_ones_kept(tmp_path):
    dead = tmp_path / f".state.pt.{_dead_pid()}.partial.pt"
    live = tmp_path / f".last.lcs.{os.getppid()}.partial.lcs"
    other = tmp_path / ".hidden.partial"  # not a name atomic_path makes
    for path in (dead, live, other):
        path.write_bytes(b"half")
    assert remove_leftovers(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and other.exists()


# ---- training: resumable at every instant ----------------------------------------------------------------------------
def _tiny(colin27, out, **more):
    return TrainSettings(colin27, out, "colin27", spacing=8.0, model=ModelConfig(4, 2), labels=TINY_LABELS[:2],
                         validate_every=2, validation_subjects=1, device="cpu", workers=0, **more)


def _resume(colin27, out, steps):
    return train(TrainSettings(colin27, out, "colin27", steps=steps, device="cpu", workers=0, resume=True))


def _history(out: Path) -> list[dict]:
    with open(out / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _complete(out: Path) -> int:
    """Every file of the run folder is whole and consistent; returns the step of state.pt."""
    for lcs in out.glob("*.lcs"):
        if not PARTIAL.match(lcs.name):  # a killed writer's temporary file: half written, never read
            Checkpoint.load(lcs)
    state = torch.load(out / "state.pt", map_location="cpu", weights_only=True)
    step = int(state["step"])
    assert [int(s) for s in state["history"][:, 0].tolist()] == list(range(1, step + 1))
    steps = [int(r["step"]) for r in _history(out)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) <= step  # never ahead of state.pt, no gap or repeat
    assert all(r["loss"] for r in _history(out))
    return step


@pytest.mark.slow  # four training runs; test_training.py's resume tests keep resuming in the fast tier
def test_a_run_resumes_from_what_a_kill_leaves_at_each_point(colin27, tmp_path):
    """The files a kill leaves, made by hand from real runs: checkpoints ahead of state.pt (killed before it was
    replaced), history.csv behind it (killed before the history), and a killed process's temporary file. Each resumes with a
    history without gaps or repeats."""
    out = tmp_path / "run"
    train(_tiny(colin27, out, steps=2))
    at_2 = {name: (out / name).read_bytes() for name in ("state.pt", "history.csv")}
    _resume(colin27, out, 4)
    # killed after best.lcs/last.lcs of step 4, before its state.pt: state.pt and history.csv of step 2
    for name, data in at_2.items():
        (out / name).write_bytes(data)
    leftover = out / f".state.pt.{_dead_pid()}.partial.pt"
    leftover.write_bytes(at_2["state.pt"][:100])
    best_at_4 = Checkpoint.load(out / "best.lcs").provenance["validation_dice"]
    _resume(colin27, out, 6)
    assert _complete(out) == 6 and [int(r["step"]) for r in _history(out)] == [1, 2, 3, 4, 5, 6]
    assert not leftover.exists()
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["best"] >= best_at_4 and Checkpoint.load(out / "best.lcs").provenance["validation_dice"] == state["best"]
    # killed after state.pt of step 6, before history.csv: history.csv of step 2; resuming with nothing left to do
    (out / "history.csv").write_bytes(at_2["history.csv"])
    (out / "history.png").unlink()
    _resume(colin27, out, 6)
    assert [int(r["step"]) for r in _history(out)] == [1, 2, 3, 4, 5, 6] and (out / "history.png").is_file()


# ---- a real kill while saving --------------------------------------------------------------------------------------
KILL_RUN = ["--spacing", "8", "--depth", "2", "--base-channels", "4", "--labels", "Frontal_Sup_L,Frontal_Sup_R",
            "--validate-every", "1", "--validation-subjects", "1", "--device", "cpu", "--workers", "0"]


def _kill_while_saving(args: list[str], out: Path, target: str, patience: float = 60.0) -> str:
    """Start `lcs train ARGS` and SIGKILL it the moment the temporary file of `target` (e.g. state.pt) appears in
    `out`, once a state.pt exists to resume from; if none shows within `patience` seconds, at a random instant.
    Returns the temporary file it saw."""
    process = subprocess.Popen([sys.executable, "-m", "LabelConditionedSegLib.cli", "train", *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        return _watch(process, out, target, patience)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()


def _watch(process: subprocess.Popen, out: Path, target: str, patience: float) -> str:
    armed, deadline = None, time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        names = os.listdir(out) if out.is_dir() else []
        if armed is None and "state.pt" in names:
            armed = time.monotonic()
        if armed is not None:
            seen = [n for n in names if n.startswith(f".{target}.") and PARTIAL.match(n)]
            if seen or time.monotonic() - armed > patience:
                if not seen:
                    time.sleep(random.uniform(0, 1))
                process.send_signal(signal.SIGKILL)
                process.wait()
                return seen[0] if seen else "(nothing: killed at random)"
        time.sleep(0.0002)
    ended = process.poll() is not None
    raise AssertionError(f"the run {'ended' if ended else 'hung'} before it was killed: "
                         f"{process.stderr.read().decode(errors='replace')[-2000:] if ended else ''}")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_a_training_run_killed_while_saving_resumes_cleanly(colin27, tmp_path):
    """`lcs train` killed (SIGKILL) while writing state.pt, then best.lcs, then history.csv (a validation and a save at
    every step): every file stays whole after each kill, each resumed run cleans up the temporary files of the killed
    one, and `--resume --steps N` ends with the whole history 1..N."""
    out = tmp_path / "run"
    seen, steps = [], []
    for i, target in enumerate(("state.pt", "best.lcs", "history.csv")):
        args = [str(colin27), "--atlas", "colin27", "-o", str(out), "--steps", "10000", *KILL_RUN] if i == 0 else \
            ["-o", str(out), "--resume", "--steps", "10000", "--device", "cpu", "--workers", "0"]
        before = _partials(out) if out.is_dir() else []
        seen.append(_kill_while_saving(args, out, target))
        assert not set(before) & set(_partials(out)), "the resumed run left the killed run's temporary files"
        steps.append(_complete(out))
    assert any(".partial" in s for s in seen), seen  # at least one kill while a save was under way
    final = steps[-1] + 2
    done = subprocess.run([sys.executable, "-m", "LabelConditionedSegLib.cli", "train", "-o", str(out), "--resume",
                           "--steps", str(final), "--device", "cpu", "--workers", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert _complete(out) == final
    assert [int(r["step"]) for r in _history(out)] == list(range(1, final + 1)), seen
    assert Checkpoint.load(out / "last.lcs").provenance["iterations"] == final
    state = torch.load(out / "state.pt", weights_only=True)
    assert Checkpoint.load(out / "best.lcs").provenance["validation_dice"] == pytest.approx(state["best"])
    assert _partials(out) == [] and (out / "history.png").is_file()


# ---- Ctrl-C --------------------------------------------------------------------------------------------------------
CTRL_C_RUN = ["--spacing", "8", "--depth", "2", "--base-channels", "4", "--labels", "Frontal_Sup_L,Frontal_Sup_R",
              "--validate-every", "3", "--validation-subjects", "1", "--device", "cpu"]  # and a data worker, by default
AS_IN_A_TERMINAL = ("import signal, sys\n"
                    "from LabelConditionedSegLib import cli, progress\n"
                    "signal.signal(signal.SIGINT, signal.default_int_handler)  # even when the tests run in the background\n"
                    "progress.EVERY_SECONDS = 0  # a log line per step: how far the run got\n"
                    "sys.exit(cli.main(sys.argv[1:]))\n")


@pytest.fixture
def ctrl_c_interrupts():
    """SIGINT raises KeyboardInterrupt, as in a terminal, even where the tests run in the background (SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.slow  # 5-8 s on 2 cores: the fast tier stays under 5 minutes; CI runs both
def test_ctrl_c_during_an_update_saves_that_step_whole_and_resume_continues(colin27, tmp_path, ctrl_c_interrupts):
    """A real SIGINT while the optimizer applies step 3 (from a step hook, after the weights changed and before the
    step is counted): the step is completed, saved (last.lcs without validation, state.pt with the optimizer's own
    step count, the history) and the run raises Cancelled naming it; --resume continues at step 4."""
    out, updates = tmp_path / "run", []

    def ctrl_c_at_update_3(optimizer, args, kwargs):
        updates.append(1)
        if len(updates) == 3:
            signal.raise_signal(signal.SIGINT)

    hook = register_optimizer_step_post_hook(ctrl_c_at_update_3)
    try:
        with pytest.raises(Cancelled, match=r"at step 3; .* holds step 3: `lcs train -o .* --resume` continues from step 3"):
            train(_tiny(colin27, out, steps=100))
    finally:
        hook.remove()
    assert len(updates) == 3 and _complete(out) == 3
    state = torch.load(out / "state.pt", weights_only=True)
    assert {int(v["step"]) for v in state["optimizer"]["state"].values()} == {3}  # the weights are those of step 3
    assert Checkpoint.load(out / "last.lcs").provenance["validation_dice"] is None  # saved at once, not validated
    assert Checkpoint.load(out / "best.lcs").provenance["iterations"] == 2
    _resume(colin27, out, 4)
    assert _complete(out) == 4 and [int(r["step"]) for r in _history(out)] == [1, 2, 3, 4]


def test_ctrl_c_waits_for_the_end_of_an_update_and_never_cuts_the_save_it_makes(ctrl_c_interrupts):
    """Held back during an update, then delivered; during Ctrl-C's own save (where torchrun passes the Ctrl-C on to
    its processes a second time) dropped, so that the save ends."""
    done = []
    with pytest.raises(KeyboardInterrupt):
        with _holding_ctrl_c():
            signal.raise_signal(signal.SIGINT)
            done.append("update")
    with _holding_ctrl_c(deliver=False):
        signal.raise_signal(signal.SIGINT)
        done.append("save")
    assert done == ["update", "save"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs process groups (POSIX)")
def test_ctrl_c_saves_the_last_completed_step_and_resume_continues_from_it(colin27, tmp_path):
    """Ctrl-C (SIGINT to the process group: the data worker gets it too) two steps past a validation: `lcs train`
    writes state.pt, last.lcs and the history of its last completed step, exits 130 saying that --resume continues from
    that step, and `--resume` does so without a gap."""
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", AS_IN_A_TERMINAL, "train", str(colin27), "--atlas", "colin27",
                                "-o", str(out), "--steps", "10000", *CTRL_C_RUN], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    watchdog = threading.Timer(240, process.kill)
    watchdog.start()
    try:
        seen, log = 0, []
        for line in process.stderr:
            log.append(line)
            if line.startswith("training: "):
                seen = int(line.split()[1].split("/")[0])
            if seen >= 5:  # the state.pt of step 3 is written, and two more steps are done
                os.killpg(process.pid, signal.SIGINT)
                break
        log.append(process.stderr.read())
        code = process.wait(timeout=120)
    finally:
        watchdog.cancel()
        process.kill()
        process.stderr.close()
    said = "".join(log).strip().splitlines()[-1]
    assert code == 130 and seen >= 5, "".join(log)[-2000:]
    match = re.fullmatch(r"lcs: cancelled by the user at step (\d+); .*--resume` continues from step \1", said)
    assert match, said
    step = int(match.group(1))
    assert step >= seen and _complete(out) == step
    assert [int(r["step"]) for r in _history(out)] == list(range(1, step + 1))
    assert Checkpoint.load(out / "last.lcs").provenance["iterations"] == step
    assert _partials(out) == []
    assert main(["train", "-o", str(out), "--resume", "--steps", str(step + 2), "--device", "cpu", "--workers", "0"]) == 0
    assert _complete(out) == step + 2 and [int(r["step"]) for r in _history(out)] == list(range(1, step + 3))
