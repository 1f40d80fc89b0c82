from megablocks_ablate.ablate.demo import run_demo
from megablocks_ablate.cli import main as cli_main
from megablocks_ablate.data.manifest import Manifest


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert run_demo(str(tmp_path / "demo"), workers=1) == 0
    out = capsys.readouterr().out
    assert "[4/4] mixture" in out
    m = Manifest.load(str(tmp_path / "demo" / "data"))
    m.verify()
    assert len(m.partitions) == 4 and len(m.units) >= 8
    # the evaluation set leaks the first paragraph of 5 corpus documents
    assert m.data["totals"]["documents_contaminated"] >= 5
    # rerunning reuses everything
    assert cli_main(["demo", "--out", str(tmp_path / "demo"), "--workers", "1"]) == 0
    assert "nothing to do" in capsys.readouterr().out
