"""The shape of the code, enforced: data_shards never imports ctvlp_dist; production kernels never
reach kernels/tuning/; no module imports another module's private names; the production path
reads no CTVLP_* environment variable but the one the test harness sets (each in a fresh
interpreter, so that nothing imported by pytest hides an edge)."""
import ast
import json
import subprocess
import sys

from .conftest import ROOT

PRODUCTION = ("ctvlp_dist", "data_shards", "kernels", "launcher")


def _loaded_after(code: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_data_shards_never_imports_ctvlp_dist():
    mods = _loaded_after("import data_shards, data_shards.synth.cohort, data_shards.ingest.pipeline, "
                         "data_shards.verify, data_shards.writer, data_shards.label_sets")
    assert "data_shards.synth.cohort" in mods
    assert not [m for m in mods if m.split(".")[0] == "ctvlp_dist"]


def test_production_kernels_never_load_tuning_code():
    mods = _loaded_after("import kernels.contrastive, kernels.contrastive_triton, kernels.conv3d, "
                         "kernels.conv3d_block, kernels.conv3d_triton, ctvlp_dist.loss, ctvlp_dist.models.ops")
    assert "kernels.conv3d_block" in mods
    assert not [m for m in mods if m.startswith("kernels.tuning")]


def _sources(packages=PRODUCTION, tuning=False, tests=False):
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if (tuning or "tuning" not in rel.parts) and (tests or not path.name.startswith("test_")):
                yield rel, path.read_text()


def test_no_module_imports_another_modules_private_names():
    """`from X import _name` across modules (the project's own) is a hidden coupling: shared
    helpers get public names."""
    bad = []
    for rel, text in _sources(PRODUCTION + ("benchmarks", "tests"), tuning=True, tests=True):
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in PRODUCTION):
                bad += [f"{rel}:{node.lineno} {a.name}" for a in node.names if a.name.startswith("_")
                        and not a.name.startswith("__")]
    assert not bad, bad


def test_production_reads_no_ctvlp_environment_variables():
    """Kernel tiles and variants come through arguments (the config's `kernels:` section), not
    environment strings. Two CTVLP_ variables remain, neither a kernel switch: the model cache's
    folder (like XDG_CACHE_HOME) and the resume test's fault injection. The launcher's Python only
    sets the variables of its node script's documented interface (launcher/ray_node.sh), for the
    job's shell; it reads none."""
    import re

    found, node_vars = {}, set(re.findall(r"CTVLP_[A-Z0-9_]+", (ROOT / "launcher" / "ray_node.sh").read_text()))
    for rel, text in _sources():
        names = set(re.findall(r"CTVLP_[A-Z0-9_]+", text))
        if rel.parts[0] == "launcher":
            assert names <= node_vars | {"CTVLP_NODE_SCRIPT"}, (rel, names - node_vars)  # the heredoc's delimiter
            assert not re.search(r"environ(\.get\(|\[)[\"']CTVLP_", text), rel
            continue
        for name in sorted(names):
            found.setdefault(name, []).append(str(rel))
    assert found == {"CTVLP_CACHE": ["ctvlp_dist/labels/model_prep.py"],
                     "CTVLP_TEST_FAIL_AT_STEP": ["ctvlp_dist/train/faults.py"]}, found
