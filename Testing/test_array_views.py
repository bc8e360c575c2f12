"""SimpleITK array views share the image's buffer: a view of an image that nothing else holds reads freed memory
(`lcs relabel` died with a segmentation fault that way). Every view in the project must be of a named image."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rooted_in_a_name(node: ast.expr) -> bool:
    """`image` or `proposal.probability`: something the caller holds, not a call's temporary result."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name)


def test_no_array_view_of_a_temporary_image():
    offenders = []
    for path in sorted(REPO.glob("**/*.py")):
        if {".venv", "build"} & set(path.parts):  # the environment and local outputs (git ignores both)
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "GetArrayViewFromImage"
                    and not all(_rooted_in_a_name(arg) for arg in node.args)):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"array views of temporary images (use sitk.GetArrayFromImage, or name the image): {offenders}"


def test_the_check_finds_a_temporary():
    tree = ast.parse("import SimpleITK as sitk\nsitk.GetArrayViewFromImage(sitk.ReadImage('x'))")
    call = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "GetArrayViewFromImage"][0]
    assert not _rooted_in_a_name(call.args[0])
