"""ablate.py: every configuration trains and evaluates, the table's mean ± std is the runs' own numbers, and an
interrupted ablation continues without redoing finished runs."""
import json
import statistics

import pytest

import ablate


@pytest.mark.slow
def test_ablation_table_and_continuation(tmp_path, monkeypatch, tiny_base):
    base = tiny_base
    argv = ["--configs", "lora,mod2,molex-seq", "--seeds", "0", "1", "--steps", "2", "--eval-n", "3", "--jobs", "2",
            "--out", str(tmp_path / "abl"), "--", "--init", str(base), "--difficulty", "1", "--n-train", "8",
            "--max-len", "96", "--batch-size", "2", "--eval-n", "0", "--lr", "1e-2"]
    results = ablate.main(argv)
    assert set(results) == {"lora", "mod2", "molex-seq"} and all(set(r) == {0, 1} for r in results.values())
    ckpt = json.loads((tmp_path / "abl" / "molex-seq-seed1" / "eval-arith-d1-test-n3-layers0.json").read_text())
    assert ckpt["molex"]["mixed_layers"] == [1, 2, 3]  # the run really had MoLEx on
    summary = json.loads((tmp_path / "abl" / "ablation.json").read_text())["mean_std"]
    table = (tmp_path / "abl" / "ablation.md").read_text()
    for name in results:
        runs = [json.loads((tmp_path / "abl" / f"{name}-seed{s}" / "ablation-eval.json").read_text())["metrics"]
                for s in (0, 1)]
        assert set(runs[0]) == {"strict", "flexible", "lines", "answer_ce", "answer_acc"} and runs[0]["answer_ce"] > 0
        for metric in ("strict", "flexible", "answer_ce"):
            values = [r[metric] for r in runs]
            assert summary[name][metric] == pytest.approx([statistics.mean(values), statistics.stdev(values)])
        assert ablate.CONFIGS[name][0] in table
    paired = json.loads((tmp_path / "abl" / "ablation.json").read_text())["paired_vs_lora"]
    for name in results:  # the paired difference is the mean of the per-seed differences to LoRA
        for metric in ("strict", "answer_ce"):
            diffs = [results[name][s][metric] - results["lora"][s][metric] for s in (0, 1)]
            assert paired[name][metric]["mean"] == pytest.approx(statistics.mean(diffs))
            assert paired[name][metric]["pairs"] == 2
    record = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    def report(name, s):
        return json.loads((tmp_path / "abl" / f"{name}-seed{s}" / "eval-arith-d1-test-n3-layers0.json").read_text())

    solved = {(name, s): set(report(name, s)["solved"]["output"]["strict"]) for name in results for s in (0, 1)}
    for name in results:  # by seed and question: each question's mean over seeds of (solved) - (LoRA solved)
        d = [sum((q in solved[name, s]) - (q in solved["lora", s]) for s in (0, 1)) / 2 for q in range(3)]
        got = record["paired_vs_lora"][name]["strict_by_question"]
        assert got["mean"] == pytest.approx(100 * statistics.mean(d))
        assert got["ci95"] == pytest.approx(100 * 1.96 * statistics.stdev(d) / 3 ** 0.5)
        most = {q for q in range(3) if q in solved[name, 0] and q in solved[name, 1]}  # most of 2 seeds = both
        assert record["overlap"]["solved"][name] == len(most)
    assert "by seed × question" in table and (tmp_path / "abl" / "ablation-overlap.png").is_file()
    # a second call finds every run done: no training
    monkeypatch.setattr(ablate.subprocess, "run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert ablate.main(argv) == results
    with pytest.raises(SystemExit):
        ablate.main(["--configs", "lora,nope"])


@pytest.mark.parametrize("name", list(ablate.CONFIGS))
def test_every_config_is_valid_train_flags(name):
    """A typo in a configuration's flags would only show after hours of an ablation's other runs."""
    import train_args

    flags = ablate.CONFIGS[name][1]
    args = train_args.parse_args(["--out", "unused"] + flags)
    assert (args.mod is not None) == ("--mod-k" in flags) and (args.molex is not None) == ("--molex" in flags)
    if "--no-mod-layer-ce" in flags:
        assert args.mod.layer_ce is False
    if "--mod-weight-range" in flags:
        assert args.mod.weight_range == flags[flags.index("--mod-weight-range") + 1]
