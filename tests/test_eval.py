"""eval.py: scoring on hand-made cases, overlap counts, the logit-lens readout against a naive reference, and the
command end to end on a tiny tuned run."""
import json
import sys

import pytest
import torch

import cli
import eval as ev
import scoring
import train
from cli import UserError
from report import overlap
from tokenizer import load_tokenizer

# ---------------------------------------------------------------- scoring

def test_acc_and_acc_norm_differ_where_length_matters():
    texts = ["ant", "elephant seal", "cat"]  # 3, 13, 3 characters
    lls = [-6.0, -9.8, -8.0]
    # acc: highest total (-6.0, option 0); acc_norm: per character -2.0, -0.75, -2.67 -> option 1
    assert scoring.score_choice_lls(lls, texts, gold_index=0) == {"acc": True, "acc_norm": False}
    assert scoring.score_choice_lls(lls, texts, gold_index=1) == {"acc": False, "acc_norm": True}
    assert scoring.score_choice_lls(lls, texts, gold_index=2) == {"acc": False, "acc_norm": False}
    # equal lengths: both agree
    assert scoring.score_choice_lls([-3.0, -1.0], ["ab", "cd"], 1) == {"acc": True, "acc_norm": True}
    with pytest.raises(ValueError, match="2 log-likelihoods for 3 options"):
        scoring.score_choice_lls([-1.0, -2.0], texts, 0)


def test_acc_norm_divides_by_the_option_text_as_lm_eval_does():
    """lm-eval-harness 0.4.13 (api/task.py, multiple_choice): completion_len = len(choice) of doc_to_choice's text,
    pred_norm = argmax(lls / completion_len); the scored continuation is " " + choice, but the space is not
    counted. By hand: "a" -2.0 / 1 = -2.0 against "abc" -5.0 / 3 = -1.67 -> option 1; counting the space
    (-2.0 / 2 = -1.0 against -5.0 / 4 = -1.25) would pick option 0."""
    assert scoring.score_choice_lls([-2.0, -5.0], ["a", "abc"], 1) == {"acc": False, "acc_norm": True}
    assert scoring.score_choice_lls([-2.0, -5.0], ["a", "abc"], 0) == {"acc": True, "acc_norm": False}


def test_generation_scoring_strict_and_flexible():
    rec = {"question": "q", "answer": "x\n#### 12", "gold": "12"}
    assert scoring.score_generation(" 5 + 7 = 12\n#### 12", rec) == {"strict": True, "flexible": True}
    assert scoring.score_generation(" so she has 12 now", rec) == {"strict": False, "flexible": True}
    assert scoring.score_generation(" #### 12 or maybe 13", rec) == {"strict": True, "flexible": False}
    assert scoring.score_generation(" The answer is 12.0", rec) == {"strict": True, "flexible": True}
    assert scoring.cut_at_stops(" 3 + 4 = 7\n#### 7\n\nQuestion: Tom has",
                                ev.STOPS["generation"]) == " 3 + 4 = 7\n#### 7"


def test_overlap_counts_on_a_hand_made_example():
    solved = {"L1": {0, 1, 2}, "L2": {1, 2, 3}, "L3": {2, 4}}
    ov = overlap(solved, n_problems=6)
    # problem 0: L1 only; 1: L1+L2; 2: all; 3: L2 only; 4: L3 only; 5: none
    exact = {tuple(e["sources"]): e["count"] for e in ov["exact"]}
    assert exact == {("L1", "L2", "L3"): 1, ("L1", "L2"): 1, ("L1", "L3"): 0, ("L2", "L3"): 0,
                     ("L1",): 1, ("L2",): 1, ("L3",): 1, (): 1}
    assert sum(exact.values()) == 6
    assert (ov["any"], ov["all"], ov["none"]) == (5, 1, 1)
    assert ov["only"] == {"L1": 1, "L2": 1, "L3": 1}
    assert ov["solved"] == {"L1": 3, "L2": 3, "L3": 2}
    assert ov["pairwise"] == [[3, 2, 1], [2, 3, 1], [1, 1, 2]]


def test_overlap_many_layers_lists_the_largest_exact_regions(monkeypatch):
    solved = {f"L{i}": set(range(i)) for i in range(1, 8)}  # nested sets
    ov = overlap(solved, n_problems=10)
    # problem 0 is solved by L1-L7, problem p (1-6) by L(p+1)-L7, problems 7-9 by none: 8 regions
    assert [(e["sources"], e["count"]) for e in ov["exact"][:2]] == [([], 3), ([f"L{i}" for i in range(1, 8)], 1)]
    assert len(ov["exact"]) == 8 and ov["exact_rest"] == 0 and sum(e["count"] for e in ov["exact"]) == 10
    monkeypatch.setattr("report.EXACT_REGIONS_MAX", 3)
    ov3 = overlap(solved, n_problems=10)
    assert [e["count"] for e in ov3["exact"]] == [3, 1, 1] and ov3["exact_rest"] == 5
    assert ov["pairwise"][2][5] == 3 and ov["any"] == 7 and ov["all"] == 1 and ov["none"] == 3
    assert ov["only"] == {**{f"L{i}": 0 for i in range(1, 7)}, "L7": 1}


# ---------------------------------------------------------------- the logit-lens readout

@pytest.fixture
def tiny(make_model):
    return make_model(seed=1, std=0.2, dim=32, vocab_size=259, hidden_dim=64, max_seq_len=96)


def test_readout_gives_each_layers_logit_lens(tiny):
    idx = torch.randint(3, 259, (2, 10), generator=torch.Generator().manual_seed(0))
    normal, hidden = tiny.forward_hidden(idx)
    for layer in range(3):
        with scoring.readout(tiny, layer):
            got = tiny(idx)[0]
        assert torch.allclose(got, tiny.lm_head(tiny.norm(hidden[layer])), atol=1e-5)
    assert tiny.mod is None and torch.equal(tiny(idx)[0], normal)  # restored


def test_readout_generation_matches_a_naive_greedy_loop(tiny):
    prompts = [[1, 50, 60, 70], [1, 80, 90]]
    layer = 1
    with scoring.readout(tiny, layer):
        got = tiny.generate(prompts, 6)  # KV cache, left padding, batched
    for p, g in zip(prompts, got):
        seq = list(p)
        for _ in range(6):  # reference: full forward each step, logits from layer 1 by hand
            _, hidden = tiny.forward_hidden(torch.tensor([seq]))
            seq.append(int(tiny.lm_head(tiny.norm(hidden[layer]))[0, -1].argmax()))
        assert g == seq[len(p):]


@torch.no_grad()
def test_line_accuracy_gives_partial_credit():
    rec = {"question": "q", "answer": "3 + 4 = 7\n7 - 2 = 5\n#### 5", "gold": "5"}
    assert scoring.line_accuracy(" 3 + 4 = 7\n7 - 2 = 5\n#### 5", rec) == 1.0
    assert scoring.line_accuracy(" 3 + 4 = 7\n7 - 2 = 6\n#### 6", rec) == pytest.approx(1 / 3)
    assert scoring.line_accuracy(" 3 +  4 = 7\n7 - 2 = 5", rec) == pytest.approx(2 / 3)  # spacing aside; a line missing
    assert scoring.line_accuracy(" 7 - 2 = 5\n3 + 4 = 7\n#### 5", rec) == pytest.approx(1 / 3)  # by position
    assert scoring.line_accuracy("", rec) == 0.0


def test_answer_scores_match_an_unbatched_reference(tiny):
    from data.format import encode_prompt, target_text
    tok = load_tokenizer("byte")
    records = [{"question": "Tom has 3 pens. He buys 2 more. How many?", "answer": "3 + 2 = 5\n#### 5", "gold": "5"},
               {"question": "Ann has 9.", "answer": "#### 9", "gold": "9"},
               {"question": "Mia has 4 cups and 1 more.", "answer": "4 + 1 = 5\n#### 5", "gold": "5"}]
    total, right, count = 0.0, 0, 0
    for rec in records:
        prompt = encode_prompt(tok, rec)
        answer = tok.encode(target_text(rec)) + [tok.eos_id]
        with torch.no_grad():
            logp = torch.log_softmax(tiny(torch.tensor([prompt + answer]))[0][0], -1)
        total -= sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(answer))
        right += sum(int(logp[len(prompt) - 1 + i].argmax()) == t for i, t in enumerate(answer))
        count += len(answer)
    ce, acc = scoring.answer_scores(tiny, tok, records, batch_size=2)
    assert ce == pytest.approx(total / count, rel=1e-5) and acc == pytest.approx(100 * right / count)
    with torch.no_grad():  # sharper logits, the same top choices: a lower CE, the same token accuracy
        tiny.lm_head.weight.mul_(3)
    sharp_ce, sharp_acc = scoring.answer_scores(tiny, tok, records, batch_size=2)
    with torch.no_grad():
        tiny.lm_head.weight.div_(3)
    assert sharp_acc == acc and sharp_ce != ce


def test_option_logliks_match_an_unbatched_reference(tiny):
    tok = load_tokenizer("byte")
    records = [{"question": "Tom has 3 pens. How many?", "choices": ["3", "four", "12"], "labels": ["A", "B", "C"],
                "gold": "A"},
               {"question": "Which is more?", "choices": ["5", "9"], "labels": ["A", "B"], "gold": "B"}]
    got = scoring.option_logliks(tiny, tok, records, layers=[0, 2], batch_size=2)
    for r, rec in enumerate(records):
        for j, choice in enumerate(rec["choices"]):
            prompt = [1] + tok.encode(f"Question: {rec['question']}\nAnswer:")
            cont = tok.encode(" " + choice)
            ids = torch.tensor([prompt + cont])
            with torch.no_grad():
                logits, hidden = tiny.forward_hidden(ids)
                sources = (("output", logits), ("layer_1", tiny.lm_head(tiny.norm(hidden[0]))),
                           ("layer_3", tiny.lm_head(tiny.norm(hidden[2]))))
            for source, lg in sources:
                lp = torch.log_softmax(lg[0], -1)
                ref = sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(cont))
                assert got[source][r][j] == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize("addon", ["mod", "molex"])
def test_option_logliks_and_answer_scores_of_mod_and_molex_runs_match_full_logits(tiny, addon):
    """Read out at the scored positions only, in length-sorted batches: the same as each row's full logits."""
    from data.format import encode_prompt, target_text
    from mod import MoDConfig, attach_mod
    from molex import MoLExConfig, attach_molex
    tok = load_tokenizer("byte")
    if addon == "mod":
        attach_mod(tiny, MoDConfig(k=2), verbose=False)
        with torch.no_grad():  # an ensemble that differs from the final layer
            tiny.mod.ensemble_weight.fill_(0.7)
            tiny.mod.router.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    else:
        attach_molex(tiny, MoLExConfig(alpha=0.6), verbose=False)  # expert share 0.4: experts count
        with torch.no_grad():
            tiny.molex.gate_weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    records = [{"question": "Tom has 3 pens. How many?", "choices": ["3", "four", "12"], "labels": ["A", "B", "C"],
                "gold": "A"},
               {"question": "Which is more?", "choices": ["5", "9"], "labels": ["A", "B"], "gold": "B"}]
    got = scoring.option_logliks(tiny, tok, records, layers=[2], batch_size=2)
    for r, rec in enumerate(records):
        for j, choice in enumerate(rec["choices"]):
            prompt = [1] + tok.encode(f"Question: {rec['question']}\nAnswer:")
            cont = tok.encode(" " + choice)
            with torch.no_grad():
                logits = tiny(torch.tensor([prompt + cont]), prompt_end=len(prompt))[0]
            lp = torch.log_softmax(logits[0], -1)
            ref = sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(cont))
            assert got["output"][r][j] == pytest.approx(ref, abs=1e-4)
    gen = [{"question": "Ann has 9 and 3 more.", "answer": "9 + 3 = 12\n#### 12", "gold": "12"},
           {"question": "Bo has 2.", "answer": "#### 2", "gold": "2"},
           {"question": "Cy has 4 cups and 1 more.", "answer": "4 + 1 = 5\n#### 5", "gold": "5"}]
    total, count = 0.0, 0
    for rec in gen:
        prompt, answer = encode_prompt(tok, rec), tok.encode(target_text(rec)) + [tok.eos_id]
        with torch.no_grad():
            logp = torch.log_softmax(tiny(torch.tensor([prompt + answer]), prompt_end=len(prompt))[0][0], -1)
        total -= sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(answer))
        count += len(answer)
    assert scoring.answer_scores(tiny, tok, gen, batch_size=2)[0] == pytest.approx(total / count, rel=1e-5)


def test_mod_layers_are_read_through_their_trained_norms(tiny):
    from mod import MoDConfig, attach_mod
    attach_mod(tiny, MoDConfig(k=2), verbose=False)
    with torch.no_grad():  # trained norms that differ from the final norm
        tiny.mod.norms[0].weight.copy_(torch.linspace(0.5, 2.0, 32))
    idx = torch.randint(3, 259, (2, 10), generator=torch.Generator().manual_seed(0))
    ensemble, hidden = tiny.forward_hidden(idx)
    by_hand = {0: tiny.lm_head(tiny.norm(hidden[0])),  # before the ensemble: the plain logit lens
               1: tiny.lm_head(tiny.mod.norms[0](hidden[1])),  # MoD's own norm for layer 2 of 3
               2: tiny.lm_head(tiny.norm(hidden[2]))}  # the final layer alone
    for layer, ref in by_hand.items():
        with scoring.readout(tiny, layer):
            assert torch.allclose(tiny(idx)[0], ref, atol=1e-5)
        assert torch.allclose(scoring.layer_head(tiny, layer, hidden[layer]), ref, atol=1e-5)
    assert tiny.mod.only_layer is None and torch.equal(tiny(idx)[0], ensemble)  # restored
    assert not torch.allclose(by_hand[1], tiny.lm_head(tiny.norm(hidden[1])), atol=1e-3)  # the test can fail


def test_batching_does_not_change_generations(tiny):
    tok = load_tokenizer("byte")
    prompts = [[1] + tok.encode("ab" * (i + 1)) for i in range(5)]
    one = scoring.generate_texts(tiny, tok, prompts, 5, batch_size=1, stops=(), desc="x")
    many = scoring.generate_texts(tiny, tok, prompts, 5, batch_size=3, stops=(), desc="x")
    assert one == many


# ---------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, tiny_base):
    folder = tmp_path_factory.mktemp("eval")
    (folder / "base").symlink_to(tiny_base)
    train.main(["--init", str(folder / "base"), "--data", "choice", "--difficulty", "1", "--n-train", "8",
                "--max-len", "96", "--batch-size", "4", "--max-steps", "2", "--eval-n", "0",
                "--out", str(folder / "run")])
    return folder


def test_eval_command_on_a_choice_run(tuned_run):
    report = ev.main(["--ckpt", str(tuned_run / "run"), "--n", "6", "--layers", "2", "--baseline"])
    assert report["data"] == "choice" and report["difficulty"] == 1 and report["n"] == 6
    assert set(report["metrics"]) == {"output", "layer_2", "layer_3", "base"}
    assert set(report["metrics"]["output"]) == {"acc", "acc_norm"}  # tuned on option texts: no acc_gen
    assert report["outputs"] == {}  # nothing generated
    for source, per_record in report["option_logliks"].items():  # every option's log-likelihood, as scored
        for r, (lls, problem) in enumerate(zip(per_record, report["problems"])):
            assert len(lls) == len(problem["choices"])
            gold = problem["labels"].index(problem["gold"])
            assert (r in report["solved"][source]["acc"]) == (max(range(len(lls)), key=lls.__getitem__) == gold)
    for source, per_metric in report["solved"].items():  # percentages agree with the solved lists
        for m, idx in per_metric.items():
            assert report["metrics"][source][m] == pytest.approx(100 * len(idx) / 6)
    assert report["overlap"]["sources"] == ["layer_2", "layer_3"]
    written = json.loads((tuned_run / "run" / "eval-choice-d1-test-n6-layers2.json").read_text())
    assert written["metrics"] == report["metrics"]
    md = (tuned_run / "run" / "eval-choice-d1-test-n6-layers2.md").read_text()
    assert "| model output |" in md and "layer 3/3" in md and "Venn" in md
    with_gen = ev.main(["--ckpt", str(tuned_run / "run"), "--n", "6", "--layers", "2", "--baseline", "--acc-gen"])
    assert set(with_gen["metrics"]["output"]) == {"acc", "acc_norm", "acc_gen"}
    assert set(with_gen["metrics"]["base"]) == {"acc", "acc_norm", "acc_gen"} and len(with_gen["outputs"]["base"]) == 6
    for source in report["metrics"]:  # generating changes no log-likelihood score
        for m in ("acc", "acc_norm"):
            assert with_gen["metrics"][source][m] == report["metrics"][source][m]


def test_eval_command_on_a_mod_and_molex_run(tuned_run):
    run = tuned_run / "addons"
    train.main(["--init", str(tuned_run / "base"), "--data", "arith", "--difficulty", "1", "--n-train", "8",
                "--max-len", "96", "--batch-size", "4", "--max-steps", "2", "--eval-n", "0", "--mod-k", "2",
                "--molex", "--molex-rule", "sequence", "--out", str(run)])
    report = ev.main(["--ckpt", str(run), "--n", "5", "--layers", "3", "--max-new-tokens", "6"])
    rt = report["mod_routing"]
    assert rt["layers"] == [2, 3] and rt["tokens"] > 0 and sum(rt["mean_weight"]) == pytest.approx(1, abs=1e-5)
    assert all(0 <= v <= 1 for v in rt["sparsity"] + rt["top1"])
    mx = report["molex"]
    assert mx["mixed_layers"] == [1, 2, 3]
    assert [sum(row) for row in mx["counts"]] == [5, 5, 5]  # each test prompt counted once per mixed layer
    assert all(sum(row) == pytest.approx(1, abs=1e-3) for row in mx["fractions"])
    md = (run / "eval-arith-d1-test-n5-layers3-new6.md").read_text()
    assert "MoD ensemble of 2" in md and "layer 2/3 (MoD norm)" in md and "layer 1/3 (logit lens)" in md
    assert "MoD routing weights" in md and "MoLEx" in md
    if ev_has_matplotlib():
        assert {p.name for p in run.glob("*.png")} >= {f"eval-arith-d1-test-n5-layers3-new6-{p}.png"
                                                        for p in ("routing", "molex")}


def ev_has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_eval_of_an_untuned_base_and_no_matplotlib(tuned_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tuned_run / "base-eval"
    report = ev.main(["--init", str(tuned_run / "base"), "--data", "arith", "--difficulty", "1", "--n", "3",
                      "--max-new-tokens", "6", "--layers", "all", "--out", str(out)])
    assert set(report["metrics"]) == {"output", "layer_1", "layer_2", "layer_3"}
    assert set(report["metrics"]["output"]) == {"strict", "flexible", "lines", "answer_ce", "answer_acc"}
    assert set(report["metrics"]["layer_1"]) == {"strict", "flexible", "lines"}
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert (out / "eval-arith-d1-test-n3-layersall-new6.md").is_file() and not list(out.glob("*.png"))


def test_eval_bad_input(tuned_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--ckpt", str(tmp_path / "nothing")])
    assert e.value.code == 2 and "--ckpt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        ev.main(["--init", str(tuned_run / "base"), "--data", "no-such-data"])
    assert "no-such-data" in str(e.value.code)


@pytest.mark.parametrize("context", [160, 512, 4096])
def test_default_generation_length_leaves_room_for_the_prompts(context, shared_dir, tmp_path):
    """Every built-in task and every prepared data set, with a tiny context, the built-in base's (512) and
    LLaMA-2's: the default length leaves the longest prompt its room, or at least half the context."""
    from data import BUILTIN_TASKS, load_examples, task_kind
    from data.format import encode_prompt, target_text
    from data.prepare import DATASETS, prepare
    tok = load_tokenizer("byte")
    sets = {name: load_examples(name, "test", difficulty=3) for name in BUILTIN_TASKS}
    for name in DATASETS:
        prepare(name, shared_dir / "datasets" / name, tmp_path / name)
        sets[name] = load_examples(str(tmp_path / name), "test")
    for name, records in sets.items():
        if task_kind(records[0]) != "generation":
            continue  # multiple choice generates one label (8 tokens)
        prompts = [encode_prompt(tok, r) for r in records]
        longest = max(len(tok.encode(target_text(r))) for r in records)
        n = ev.generation_length(longest, max(map(len, prompts)), context)
        assert n >= 1 and context - n >= min(max(map(len, prompts)), context // 2), (name, n)


def test_reports_of_different_evaluations_never_replace_one_another(tuned_run, tmp_path, monkeypatch):
    out = tmp_path / "reports"
    common = ["--init", str(tuned_run / "base"), "--data", "arith", "--difficulty", "1", "--max-new-tokens", "4",
              "--layers", "1", "--out", str(out)]
    ev.main(common + ["--n", "3"])
    ev.main(common + ["--n", "2"])  # a smaller evaluation: its own report
    assert json.loads((out / "eval-arith-d1-test-n3-layers1-new4.json").read_text())["n"] == 3
    assert json.loads((out / "eval-arith-d1-test-n2-layers1-new4.json").read_text())["n"] == 2
    ev.main(common + ["--n", "2"])  # the same evaluation again: replaced
    before = (out / "eval-arith-d1-test-n2-layers1-new4.json").read_bytes()
    with pytest.raises(UserError, match=r"is another evaluation \(--overlap-metric None there, 'flexible' now"):
        ev.main(common + ["--n", "2", "--overlap-metric", "flexible"])
    assert (out / "eval-arith-d1-test-n2-layers1-new4.json").read_bytes() == before

    calls = []
    monkeypatch.setattr(ev, "load_run", lambda *a, **k: calls.append(1))  # not even the model is loaded
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match=r"--out .*a-file/sub: cannot write the reports there"):
        ev.main(common[:-1] + [str(tmp_path / "a-file" / "sub"), "--n", "2"])
    assert calls == []
    with pytest.raises(SystemExit) as e:  # the command: one line, no traceback
        cli.run_main(lambda: ev.main(common[:-1] + [str(tmp_path / "a-file"), "--n", "2"]), "eval.py")
    assert str(e.value.code).startswith("eval.py: error: --out") and calls == []


def test_a_run_tuned_on_labels_is_scored_on_them_too(tuned_run):
    run = tuned_run / "labels"
    train.main(["--init", str(tuned_run / "base"), "--data", "choice", "--difficulty", "1", "--n-train", "8",
                "--max-len", "96", "--batch-size", "4", "--max-steps", "1", "--eval-n", "0",
                "--choice-target", "label", "--out", str(run)])
    report = ev.main(["--ckpt", str(run), "--n", "4", "--layers", "0"])
    assert set(report["metrics"]["output"]) == {"acc", "acc_norm", "acc_gen"}
    assert set(ev.main(["--ckpt", str(run), "--n", "4", "--layers", "0", "--no-acc-gen"])["metrics"]["output"]) == {
        "acc", "acc_norm"}


# ---------------------------------------------------------------- against lm-evaluation-harness

# ARC-Easy-like questions (written for this test): options of unlike lengths, so acc and acc_norm can part, and
# digits, which SmolLM2's tokenizer splits one by one
ARC_LIKE = [
    ("Which part of a plant takes in most of the water it needs?", ["roots", "leaves", "the flowers at the top",
                                                                    "stem"], 0),
    ("How many legs does an insect have?", ["4", "6", "8", "10"], 1),
    ("What do we call the change of liquid water into water vapor?", ["melting", "freezing", "evaporation",
                                                                      "condensation"], 2),
    ("A student drops a ball from a height of 2 meters. Which force pulls the ball to the ground?",
     ["friction", "magnetism", "gravity", "the push of the air around the falling ball"], 2),
    ("Which of these is a renewable source of energy?", ["coal", "oil", "natural gas", "wind"], 3),
    ("Earth takes about how many days to orbit the Sun once?", ["1", "30", "365", "about 24 hours"], 2),
]


@pytest.mark.slow
def test_choice_scores_match_lm_eval_harness(smollm2_gguf_path, tmp_path, monkeypatch):
    """eval.py's acc, acc_norm and every option's log-likelihood equal lm-evaluation-harness 0.4.13's (its HFLM on
    transformers' model holding the same SmolLM2 weights and transformers' tokenizer of the GGUF file, its
    evaluator on a task written like its arc_easy) on a few ARC-like questions."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    import bench_lm_eval as lme
    why = lme.lm_eval_missing()
    if why:
        pytest.skip(why)
    from checkpoint import load_run
    records = [{"question": q, "choices": c, "labels": ["A", "B", "C", "D"], "gold": "ABCD"[g]} for q, c, g in ARC_LIKE]
    model, tok, _, _ = load_run(None, str(smollm2_gguf_path))
    ours = lme.our_scores(model, tok, records, batch_size=4)
    ref = lme.lm_eval_scores(lme.lm_eval_model(model, smollm2_gguf_path, 4),
                             lme.write_jsonl(records, tmp_path / "test.jsonl"))
    assert [len(x) for x in ref["lls"]] == [len(r["choices"]) for r in records]
    for got, want in zip(ours["lls"], ref["lls"]):
        assert got == pytest.approx(want, abs=1e-4)
    assert ours["acc"] == ref["acc"]
    assert ours["acc_norm"] == ref["acc_norm"]
