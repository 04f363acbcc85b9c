"""Bookkeeping of the savings benchmark: FLOPs, the savings arithmetic, the tiny pipeline end to end."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, GPT2Config, GPT2LMHeadModel

from bench import common, report, savings


def test_flops_per_token_matches_counted_matmuls():
    seq = 16
    config = GPT2Config(vocab_size=300, n_positions=seq, n_layer=2, n_embd=32, n_head=4, n_inner=96)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(5, 300, (3, seq))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids)
    per_token = counter.get_total_flops() / ids.numel()
    assert common.forward_flops_per_token(config, seq) == pytest.approx(per_token, rel=0.01)
    assert common.train_flops_per_token(config, seq) == pytest.approx(3 * per_token, rel=0.01)


def test_bert_flops_count_the_head_on_masked_tokens_only():
    """The engine scores a masked LM's head on its masked 15% only (checked against torch's
    counter in test_cost); the benchmark counts the same."""
    config = BertConfig(vocab_size=4096, max_position_embeddings=64, num_hidden_layers=4, hidden_size=128,
                        num_attention_heads=4, intermediate_size=512)
    every_position = savings.cost.forward_flops_per_token(config, 64, convention="standard")
    head = 2 * 128 * 4096 + 2 * 128 * 128
    assert common.forward_flops_per_token(config, 64) == pytest.approx(every_position - 0.85 * head)


def test_each_family_runs_its_own_recipe_and_the_command_line_wins():
    default = savings.SIZES["default"]
    gpt2, bert = default.for_model("gpt2"), default.for_model("bert")
    assert (gpt2.small_steps, gpt2.steps, gpt2.lr) == (600, 600, 2e-3)
    assert (bert.small_steps, bert.steps, bert.lr) == (200, 1000, 7e-4)
    assert bert.bert == {} and (bert.batch, bert.seq_len, bert.fit_steps) == (gpt2.batch, gpt2.seq_len, gpt2.fit_steps)
    told = savings.with_overrides(default, {"steps": 300})
    assert told.for_model("bert").steps == told.for_model("gpt2").steps == 300
    assert told.for_model("bert").small_steps == 200  # what was not told keeps the family's value


def test_flops_by_hand_for_gpt2():
    config = GPT2Config(vocab_size=1000, n_positions=64, n_layer=4, n_embd=128, n_head=4, n_inner=512)
    d, f, layers, seq, vocab = 128, 512, 4, 64, 1000
    matmuls = layers * (4 * d * d + 2 * d * f + 2 * seq * d) + d * vocab
    assert common.forward_flops_per_token(config, seq) == 2 * matmuls


def test_cost_to_reach_interpolates_between_eval_points():
    costs = [0.0, 10.0, 20.0, 30.0, 40.0]
    losses = [6.0, 5.0, 4.0, 3.0, 2.5]
    assert report.cost_to_reach(costs, losses, 3.5) == pytest.approx(25.0)
    assert report.cost_to_reach(costs, losses, 4.0) == pytest.approx(20.0)  # exactly on a point
    assert report.cost_to_reach(costs, losses, 6.5) == 0.0  # already there at the start
    assert report.cost_to_reach(costs, losses, 2.0) is None  # never reached
    # A noisy curve counts its first crossing.
    assert report.cost_to_reach([0, 10, 20, 30], [5.0, 3.0, 4.0, 2.0], 3.5) == pytest.approx(7.5)


def test_saving_of_a_synthetic_grown_curve_with_a_known_crossing():
    # Scratch: 100 FLOPs to reach its final 3.0. Grown: 10 FLOPs of fitting, then 2 FLOPs/step,
    # crossing 3.0 halfway between step 10 (3.2) and step 20 (2.8) -> 10 + 2 * 15 = 40 FLOPs.
    scratch_losses = [7.0, 5.0, 3.0]
    grown_steps, grown_losses = [0, 10, 20], [4.0, 3.2, 2.8]
    grown_costs = [10 + 2 * s for s in grown_steps]
    assert report.cost_to_reach(grown_costs, grown_losses, scratch_losses[-1]) == pytest.approx(40.0)
    assert report.saving(grown_costs, grown_losses, 3.0, 100.0) == pytest.approx(0.6)
    assert report.saving(grown_costs, grown_losses, 2.0, 100.0) is None



def test_savings_at_shorter_budgets_use_the_scratch_loss_at_that_point():
    ref_costs, ref_losses = [0.0, 10.0, 20.0, 30.0, 40.0], [8.0, 6.0, 5.0, 4.5, 4.0]
    assert report.loss_at(ref_costs, ref_losses, 15.0) == pytest.approx(5.5)
    assert report.loss_at(ref_costs, ref_losses, 99.0) == 4.0 and report.loss_at(ref_costs, ref_losses, -1) == 8.0
    # A grown run: starts at 5.5 after 4 FLOPs of growth, then the same per-step cost.
    grown = report.savings_by_budget([4.0, 14.0, 24.0, 34.0, 44.0], [5.5, 5.0, 4.6, 4.4, 4.2], ref_costs, ref_losses)
    assert grown["0.25"] == pytest.approx(1 - 4.0 / 10.0)  # target 6.0: reached at the start
    assert grown["0.5"] == pytest.approx(1 - 14.0 / 20.0)  # target 5.0: reached after one step
    assert grown["0.75"] == pytest.approx(1 - 29.0 / 30.0)  # target 4.5: halfway from 4.6 (24) to 4.4 (34)
    assert grown["1.0"] is None  # 4.0 never reached
    assert report.savings_by_budget(ref_costs, ref_losses, ref_costs, ref_losses) == {
        str(f): pytest.approx(0.0) for f in report.BUDGETS}

def test_records_compare_each_run_with_the_scratch_run_of_its_seed():
    def run(strategy, seed, losses, fit=0.0):
        return {"strategy": strategy, "seed": seed, "losses": losses, "init_loss": losses[0], "fit_flops": fit,
                "flops": [fit + 10.0 * i for i in range(len(losses))], "wall": [1.0 * i for i in range(len(losses))]}

    result = {"model": "gpt2", "small_loss": 5.5, "runs": [
        run("scratch", 0, [8.0, 6.0, 5.0]), run("scratch", 1, [8.0, 6.0, 4.0]),
        run("ligo", 0, [5.6, 5.0, 4.5], fit=5.0), run("ligo", 1, [5.6, 5.0, 4.5], fit=5.0),
    ]}
    recs = {(r["strategy"], r["seed"]): r for r in report.records(result)}
    assert recs[("scratch", 0)]["flops_saved"] == 0.0
    assert recs[("ligo", 0)]["flops_saved"] == pytest.approx(1 - 15.0 / 20.0)  # reaches 5.0 at step 1
    assert recs[("ligo", 0)]["wall_saved"] == pytest.approx(1 - 1.0 / 2.0)
    assert recs[("ligo", 0)]["flops_saved_fit_free"] == pytest.approx(1 - 10.0 / 20.0)  # fitting left out
    assert recs[("ligo", 1)]["flops_saved"] is None and recs[("ligo", 1)]["wall_saved"] is None
    assert recs[("ligo", 1)]["scratch_final_loss"] == 4.0 and recs[("ligo", 0)]["small_loss"] == 5.5
    for rec in recs.values():
        assert {"model", "strategy", "seed", "flops_saved", "wall_saved", "final_loss", "small_loss",
                "scratch_final_loss"} <= set(rec)



def test_ligo_is_compared_with_the_best_baseline_seed_by_seed():
    def rec(strategy, seed, saved, final, free=None):
        return {"strategy": strategy, "seed": seed, "flops_saved": saved, "final_loss": final,
                "flops_saved_fit_free": saved if free is None else free}

    recs = [rec("stack", 0, 0.40, 5.0), rec("stack", 1, 0.44, 5.0), rec("preserve", 0, 0.47, 4.9),
            rec("preserve", 1, 0.45, 4.9), rec("ligo", 0, 0.45, 4.8, free=0.49), rec("ligo", 1, None, 4.95)]
    assert report.best_baseline(recs) == "preserve"  # mean 46% against stack's 42%
    gaps = report.paired_gaps(recs, "ligo", "preserve")
    assert gaps[0] == pytest.approx(-0.02) and gaps[1] is None  # seed 1's ligo never reached
    assert report.paired_gaps(recs, "ligo", "preserve", "flops_saved_fit_free")[0] == pytest.approx(0.02)
    text = "\n".join(report._comparison(recs))
    assert "ligo minus preserve: seed 0: -2.0, seed 1: n/a" in text
    assert "ligo minus preserve: seed 0: -0.100, seed 1: +0.050" in text  # final loss, nats
    # Where no baseline reaches the scratch loss, the best is the lowest final loss.
    never = [dict(r, flops_saved=None) for r in recs]
    assert report.best_baseline([r for r in never if r["strategy"] != "preserve"]) == "stack"
    assert report.best_baseline(never) == "preserve"

def test_equal_flops_gaps_compare_losses_at_the_same_compute():
    def run(strategy, flops, losses):
        return {"strategy": strategy, "seed": 0, "flops": flops, "losses": losses}

    runs = [run("scratch", [0.0, 50.0, 100.0], [8.0, 5.0, 4.0]),
            run("preserve", [0.0, 50.0, 100.0], [5.0, 4.0, 3.5]),
            # Fitting costs 10 FLOPs and lowers the start from 5.0 to 4.9; then it trails.
            run("ligo", [10.0, 60.0, 110.0], [4.9, 4.05, 3.5])]
    gaps = report.equal_flops_gaps(runs, "ligo", "preserve")
    assert gaps["fit"] == [pytest.approx(4.9 - 4.8)]  # preserve trained 10 FLOPs by then: 5.0 -> 4.8
    assert gaps["0.5"] == [pytest.approx((4.9 - 0.85 * 0.8) - 4.0)]  # ligo at 50: 40/50 of the way to 4.05
    assert gaps["1.0"] == [pytest.approx((4.05 - 0.55 * 0.8) - 3.5)]
    table = "\n".join(report._equal_flops_table(runs, "preserve"))
    assert "| ligo minus preserve | +0.100 |" in table


def test_tiny_pipeline_produces_a_curve_for_every_strategy(tmp_path):
    pytest.importorskip("matplotlib")
    size = savings.SIZES["tiny"]
    threads = torch.get_num_threads()
    try:
        recs = savings.main(["--size", "tiny", "--models", "gpt2,bert", "--seeds", "0", "--threads", "1",
                              "--strategies", ",".join(savings.STRATEGIES), "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert {(r["model"], r["strategy"]) for r in recs} == {(m, s) for m in savings.MODELS for s in savings.STRATEGIES}
    on_disk = json.loads((tmp_path / "savings.json").read_text())
    assert on_disk == json.loads(json.dumps(recs))
    curves = json.loads((tmp_path / "savings_curves.json").read_text())["results"]
    n_evals = size.steps // size.eval_every + 1
    for res in curves:
        step_flops = res["step_flops"]
        for run in res["runs"]:
            assert run["steps"] == [i * size.eval_every for i in range(n_evals)]
            assert len(run["losses"]) == n_evals and all(l > 0 for l in run["losses"])
            assert run["final_seen_loss"] > 0  # training sequences: scored once, at the end
            # FLOPs: growth/fitting first, then one large-model step per step.
            assert run["flops"] == pytest.approx([run["fit_flops"] + s * step_flops for s in run["steps"]])
            assert run["ligo_init"] == savings.LIGO_VARIANTS.get(run["strategy"])  # ligo: the exact start
            if run["strategy"].startswith("ligo"):
                # Fitting: a large-model training step per fitting step, plus the operator's work.
                assert size.fit_steps * step_flops < run["fit_flops"] < 2 * size.fit_steps * step_flops
            elif run["strategy"] == "scratch":
                assert run["fit_flops"] == 0.0
            else:
                # Fixed operators: one materialisation, cheaper than one training step.
                assert 0.0 < run["fit_flops"] < step_flops
            if run["strategy"] == "preserve":
                # Function-preserving growth of the pretrained small model starts at its loss, up to
                # the second-order effect of moving copies apart (spread 2): 0.004-0.022 nats on the
                # tiny BERT over seeds 0-3.
                assert run["init_loss"] == pytest.approx(res["small_loss"], abs=0.03)
        assert res["recipe"]["steps"] == size.steps and res["recipe"]["bert"] == {}
    seen = {(res["model"], run["strategy"]): run["final_seen_loss"] for res in curves for run in res["runs"]}
    assert {(r["model"], r["strategy"]): r["final_seen_loss"] for r in recs} == seen
    # Curves recorded before the seen loss was scored once still give their last value.
    assert report._final_seen_loss({"train_sample_losses": [5.0, 4.5]}) == 4.5
    table = (tmp_path / "savings.md").read_text()
    assert "| ligo |" in table and "| ligo-stack |" in table and "## bert" in table
    assert f"every large run {size.steps} steps x {size.batch} x {size.seq_len} tokens" in table
    assert (tmp_path / "savings_loss_curves.png").stat().st_size > 10_000
    # --report rebuilds the same records and tables from the recorded curves, training nothing.
    (tmp_path / "savings.json").unlink()
    rebuilt = savings.main(["--report", str(tmp_path / "savings_curves.json")])
    assert json.loads(json.dumps(rebuilt)) == json.loads(json.dumps(recs))
    assert json.loads((tmp_path / "savings.json").read_text()) == json.loads(json.dumps(recs))
    assert "Tables rewritten from the recorded curves" in (tmp_path / "savings.md").read_text()
    with pytest.raises(SystemExit):
        savings.main(["--report", str(tmp_path / "missing.json")])


def test_fit_sweep_reports_every_setting_with_its_cost(tmp_path):
    from bench import fit_sweep

    out = tmp_path / "sweep.md"
    threads = torch.get_num_threads()
    try:
        result = fit_sweep.main(["--size", "tiny", "--model", "gpt2", "--inits", "preserve", "--steps", "2,4",
                                 "--lrs", "1e-3", "--fit-batches", "4,8", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    rows = result["rows"]
    assert [(r["init"], r["batch"], r["steps"], r["lr"]) for r in rows] == [
        ("preserve", 4, 2, 1e-3), ("preserve", 4, 4, 1e-3), ("preserve", 8, 2, 1e-3), ("preserve", 8, 4, 1e-3)]
    for r in rows:
        # A fitting step at the training batch (8) is a large-model training step plus the operator's work.
        tokens_share = r["batch"] / 8
        assert r["steps"] * tokens_share < r["fit_train_steps"] < r["steps"] * (tokens_share + 1)
        assert r["fitted_loss"] != r["start_loss"]  # the fit moved the operator
    # The function-preserving start is the small model's function.
    assert rows[0]["start_loss"] == pytest.approx(result["small_loss"], abs=0.02)
    assert "| preserve | 8 | 4 | 1e-03 |" in out.read_text()
    assert json.loads(out.with_suffix(".json").read_text()) == json.loads(json.dumps(result))


def test_symmetry_bench_finds_copies_and_their_separation():
    from bench import symmetry

    threads = torch.get_num_threads()
    try:
        rows = symmetry.main(["--size", "tiny", "--steps", "6", "--noises", "0,1", "--spreads", "0,2",
                              "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert [(r["noise"], r["spread"]) for r in rows] == [(0.0, 0.0), (0.0, 2.0), (1.0, 0.0), (1.0, 2.0)]
    stuck, moved, broken, _ = (r["probes"]["FFN units, last layer"] for r in rows)
    # tiny: 1 -> 2 layers, FFN 64 -> 128: the new (last) layer holds 64 pairs of copies.
    assert stuck["groups"] == moved["groups"] == broken["groups"] == 64
    assert stuck["copy_cos"] == pytest.approx(1.0, abs=1e-6)  # zero-output block, no breaking: never apart
    assert broken["copy_cos"] < 1 - 1e-4
    assert moved["start_cos"] < 0.5 and stuck["start_cos"] == pytest.approx(1.0, abs=1e-6)
    assert rows[1]["start_loss"] > rows[0]["start_loss"]  # separating copies is exact to first order only
    assert rows[0]["probes"]["residual units (embedding)"]["groups"] == 32  # 32 -> 64 wide: each unit twice
    # Heads 2 -> 4: copied heads are found, and growth leaves them copies (they part in training).
    values, queries = (rows[3]["probes"][f"attention {p}, first layer"] for p in ("values", "queries"))
    assert values["groups"] == queries["groups"] == 32
    assert values["start_cos"] == queries["start_cos"] == pytest.approx(1.0, abs=1e-6)


def test_mlm_head_bench_times_both_losses_on_the_same_masks():
    from bench import mlm_head

    threads = torch.get_num_threads()
    try:
        medians = mlm_head.main(["--layers", "1", "--hidden", "32", "--vocab", "101", "--batch", "2",
                                 "--seq-len", "8", "--rounds", "1", "--steps", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert set(medians) == {"head at every position", "head at masked positions (engine)"}
    assert all(ms > 0 for ms in medians.values())


def test_allocator_bench_measures_each_arm_in_its_own_process():
    from bench import allocator

    medians = allocator.main(["--models", "gpt2", "--rounds", "1", "--steps", "1", "--threads", "1"])
    assert set(medians) == {("gpt2", arm) for arm in allocator.ARMS}
    assert all(ms > 0 for ms in medians.values())
