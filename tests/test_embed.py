"""`ctvlp embed`: evaluation's embeddings streamed to disk, keyed by sample, in memory that does
not grow with the cohort."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ctvlp_dist.config import LoaderConfig, ModelConfig
from ctvlp_dist.models import CTCLIP
from ctvlp_dist.models.export import load_exported, save_exported

from .conftest import TRAIN_SHAPE, run_ctvlp, synth_dataset


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    cfg = ModelConfig(stem="k4s4", norm="gn", gn_groups=8, latent_dim=32, text_max_length=32)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("embed-model") / "model.safetensors"
    save_exported(CTCLIP(cfg).state_dict(), cfg, path, {"stage": "clip"})
    return path


def test_embed_writes_evaluations_embeddings_by_key(train_cohort, export, tmp_path):
    """Parquet and npy hold, for every sample of the cohort (every split) once, what evaluation's
    embed_split computes, keyed and in manifest order."""
    from ctvlp_dist.data import ShardIndex
    from ctvlp_dist.eval.embed import embed_split

    data, _ = train_cohort
    common = ["--checkpoint", str(export), "--data", str(data), "loader.crop=[16,32,32]", "embed.batch_size=3", "--quiet"]
    p = run_ctvlp("embed", *common, "--out", str(tmp_path / "e.parquet"))
    summary = json.loads(p.stdout.splitlines()[-2])
    run_ctvlp("embed", *common, "--out", str(tmp_path / "npy"), "--format", "npy")
    table = pq.read_table(tmp_path / "e.parquet")
    keys = table.column("key").to_pylist()
    index = ShardIndex(data, None)
    assert keys == index.keys and summary["samples"] == len(keys) == 20 and summary["dim"] == 32
    assert set(table.column("split").to_pylist()) == {"train", "val", "test"}
    image, report = (np.array(table.column(c).to_pylist(), dtype=np.float32) for c in ("image", "report"))
    assert (tmp_path / "npy" / "keys.txt").read_text().split() == keys
    assert np.array_equal(np.load(tmp_path / "npy" / "image.npy"), image)
    assert np.array_equal(np.load(tmp_path / "npy" / "report.npy"), report)
    model = load_exported(export)
    ref = embed_split(model, str(data), LoaderConfig(crop=(16, 32, 32)), "train", None, [], 5, progress=False)
    rows = [keys.index(k) for k in ref["keys"]]
    assert len(rows) == 16
    assert np.allclose(image[rows], ref["image"].numpy(), atol=1e-5)
    assert np.allclose(report[rows], ref["report"].numpy(), atol=1e-5)


def test_embed_memory_does_not_grow_with_the_cohort(export, tmp_path):
    """How much the resident set grows after the first batch, at 60 and 240 scans of 24x48x48: it
    must not follow the cohort. (Holding each read shard's pages, as the loader did before, the
    larger cohort grew 35 MB more; holding the crops would add 40 MB.)"""
    growth = {}
    for n in (60, 240):
        data = synth_dataset(tmp_path / f"d{n}", patients=n, max_samples=64, shape=TRAIN_SHAPE, spacing=(12.0, 7.0, 7.0))
        p = run_ctvlp("embed", "--checkpoint", str(export), "--data", str(data), "--out", str(tmp_path / f"{n}.parquet"),
                      "loader.crop=[24,48,48]", "embed.batch_size=4", "--quiet")
        s = json.loads(p.stdout.splitlines()[-2])
        assert s["samples"] == n
        growth[n] = s["rss_growth_bytes"]
    assert growth[240] - growth[60] < 15e6, growth
