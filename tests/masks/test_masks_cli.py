import json

from piggyback_serve.masks import artifact, cli
from tests.masks.test_artifact import make_artifact


def test_convert_to_format_2_and_back_keeps_the_task(tmp_path, lite0, capsys):
    art = make_artifact(lite0)
    old = tmp_path / "old.safetensors"
    old.write_bytes(artifact.to_bytes(art, "1"))
    new, back = tmp_path / "new.safetensors", tmp_path / "back.safetensors"
    assert cli.main(["convert", str(old), str(new)]) == 0
    assert cli.main(["convert", str(new), str(back), "--to", "1"]) == 0
    assert artifact.read_metadata(new.read_bytes())["format"] == "2"
    assert new.stat().st_size < old.stat().st_size
    assert back.stat().st_size == old.stat().st_size
    loaded = [artifact.load(p, lite0) for p in (old, new, back)]
    for name, w in lite0.maskable().items():
        first = loaded[0].switched_off(name, w.numel())
        assert all(a.switched_off(name, w.numel()).equal(first) for a in loaded[1:])
    assert "format 2" in capsys.readouterr().out


def test_inspect_shows_the_coding_and_bits_per_weight(tmp_path, lite0, capsys):
    path = artifact.write(make_artifact(lite0), tmp_path / "t.safetensors")
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    masked = sum(w.numel() for w in lite0.maskable().values())
    assert f"{8 * path.stat().st_size / masked:.3f} bits per weight" in out
    first = next(iter(lite0.maskable()))
    row = next(line for line in out.splitlines() if line.split()[:1] == [first])
    assert row.split()[3] == "elias-fano"
    assert json.loads(out[: out.index("\n}") + 2])["format"] == 2


def test_inspect_prints_the_metadata_as_json_values(tmp_path, lite0, capsys):
    art = make_artifact(lite0)
    path = artifact.write(art, tmp_path / "t.safetensors")
    assert cli.main(["inspect", str(path), "--no-backbone"]) == 0
    out = capsys.readouterr().out
    meta = json.loads(out[: out.index("\n}") + 2])
    assert meta["format"] == 2 and meta["input_size"] == art.input_size
    assert meta["threshold"] == art.threshold and isinstance(meta["threshold"], float)
    assert meta["mean"] == list(art.mean) and meta["std"] == list(art.std)
    assert meta["labels"] == art.labels and meta["metrics"] == art.metrics
    assert meta["task"] == "t" and meta["backbone_sha256"] == lite0.fingerprint
    assert "masks" not in meta  # format 2's table: the per-parameter rows below
    assert list(meta) == [k for k in artifact.read_metadata(path.read_bytes()) if k != "masks"]
