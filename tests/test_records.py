"""Per-image evaluation records (clat.records), the intervals over seeds and images (clat.stats), and the records that
evaluation writes: run_protocol's outcomes, AutoAttack's stages, `clat eval`'s <eval>.records.npz."""

import json
import math

import numpy as np
import pytest
import torch

from clat.attacks.threat import ThreatModel
from clat.base.errors import ConfigError
from clat.eval.autoattack import autoattack_outcomes
from clat.eval.accuracy import evaluate_outcomes
from clat.models import create_model
from clat.eval.protocol import EvalProtocol, run_protocol
from clat.eval.records import EvalRecord, load_record, paired_difference, record_path, save_record
from clat.base.stats import holm, seeds_images_bootstrap, t_interval, t_test_p


def _rec(bits, start=0, **meta):
    return EvalRecord(np.arange(start, start + len(bits)), {"pgd": np.array(bits, bool)}, {"protocol": {"seed": 0}, **meta})


@pytest.mark.parametrize("indices", [np.arange(2000), np.array([5, 3, 900, 17])], ids=["range", "scattered"])
def test_record_round_trip_is_exact_and_small(tmp_path, indices):
    rng = np.random.default_rng(0)
    outcomes = {k: rng.random(len(indices)) < 0.3 for k in ("clean", "pgd/run0", "pgd", "aa/apgd-ce", "aa")}
    rec = EvalRecord(indices, outcomes, {"data": "x", "protocol": {"seed": 1}})
    f = save_record(tmp_path / "e.records.npz", rec)
    back = load_record(f)
    assert np.array_equal(back.indices, indices) and back.meta == rec.meta and list(back.outcomes) == list(outcomes)
    assert all(np.array_equal(back[k], v) for k, v in outcomes.items())
    if len(indices) == 2000:  # bit-packed: a few hundred bytes per outcome per 2,000 images, indices stored as a range
        assert f.stat().st_size < 5 * 300 + 1200


def test_record_path_sits_beside_the_json():
    assert record_path("runs/a/eval.json").name == "eval.records.npz"
    assert record_path("x/eval_test_nall_s0.json").name == "eval_test_nall_s0.records.npz"


def test_damaged_or_foreign_record_files_give_one_line_errors(tmp_path):
    bad = tmp_path / "bad.records.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a clat evaluation record"):
        load_record(bad)
    with pytest.raises(ConfigError, match="no such record file"):
        load_record(tmp_path / "missing.records.npz")
    newer = tmp_path / "newer.records.npz"
    save_record(newer, _rec([1, 0]))
    z = dict(np.load(newer))
    z["format"] = np.array([99])
    np.savez(newer, **z)
    with pytest.raises(ConfigError, match="newer clat"):
        load_record(newer)


def test_record_checks_its_shape_and_indices():
    with pytest.raises(ConfigError, match="one value per image"):
        EvalRecord(np.arange(3), {"pgd": np.ones(4, bool)})
    with pytest.raises(ConfigError, match="twice"):
        EvalRecord(np.array([1, 1]), {"pgd": np.ones(2, bool)})
    with pytest.raises(ConfigError, match="has no outcome 'aa'"):
        _rec([1])["aa"]


def test_concat_and_select():
    a, b = _rec([1, 0, 1]), _rec([0, 0], start=3)
    both = EvalRecord.concat([a, b])
    assert both.n == 5 and both.acc("pgd") == 2 / 5
    assert both.select([4, 0])["pgd"].tolist() == [False, True]
    with pytest.raises(ConfigError, match="not in the record"):
        a.select([7])


def test_paired_difference_counts_discordant_images():
    # a right where b is wrong on 10 images, the reverse on 2, both agree on 88
    a = [1] * 10 + [0] * 2 + [1] * 40 + [0] * 48
    b = [0] * 10 + [1] * 2 + [1] * 40 + [0] * 48
    d = paired_difference(_rec(a), _rec(b))
    assert (d.n, d.only_a, d.only_b) == (100, 10, 2) and math.isclose(d.diff, 0.08)
    assert d.ci[0] < 0.08 < d.ci[1]
    assert math.isclose(d.p, 2 * sum(math.comb(12, i) for i in range(3)) / 2**12)  # exact McNemar: 0.0386
    assert "+8.0 points" in d.line()
    # only the images both hold are compared
    assert paired_difference(_rec(a), _rec(b[:50])).n == 50


def test_paired_difference_refuses_other_settings_or_no_common_images():
    a = _rec([1, 0])
    b = EvalRecord(np.arange(2), {"pgd": np.ones(2, bool)}, {"protocol": {"seed": 5}})
    with pytest.raises(ConfigError, match="different data, split or evaluation settings"):
        paired_difference(a, b)
    assert paired_difference(a, b, check_settings=False).n == 2
    with pytest.raises(ConfigError, match="share no image"):
        paired_difference(a, _rec([1, 1], start=10))


def test_t_interval_and_p_values():
    assert math.isclose(t_test_p(2.776, 4), 0.05, abs_tol=2e-4) and math.isclose(t_test_p(12.706, 1), 0.05, abs_tol=2e-4)
    iv = t_interval([0.01, 0.02, 0.015, 0.03])
    assert math.isclose(iv.estimate, 0.01875) and iv.ci[0] < iv.estimate < iv.ci[1] and iv.over == "seeds" and 0 < iv.p < 0.05
    same = t_interval([0.011, 0.011, 0.011])
    assert same.ci == pytest.approx((0.011, 0.011), abs=1e-15) and same.p == 0.0
    one = t_interval([0.02])  # one value: an estimate, no interval, no p
    assert one.estimate == 0.02 and not one.has_interval and not one.excludes_zero and math.isnan(one.p)
    assert one.to_dict()["ci"] is None and one.to_dict()["p"] is None and iv.has_interval and iv.to_dict()["ci"] == list(iv.ci)


def test_holm_adjusts_step_down():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5]


def test_seeds_images_bootstrap_covers_both_sources_of_noise():
    rng = np.random.default_rng(1)
    a = rng.random((4, 500)) < 0.3
    assert seeds_images_bootstrap(a, a).ci == (0.0, 0.0)  # identical models: no difference, no spread
    b = rng.random((4, 500)) < 0.3
    r = seeds_images_bootstrap(a, b, n_boot=2000)
    assert r.over == "seeds x images" and (r.n_seeds, r.n_images) == (4, 500)
    assert math.isclose(r.estimate, a.mean() - b.mean()) and r.ci[0] < r.estimate < r.ci[1]
    assert r == seeds_images_bootstrap(a, b, n_boot=2000)  # seeded: the same interval every time
    # a single reference model (the branch checkpoint): one row, broadcast to every seed
    one = seeds_images_bootstrap(a, b[0], n_boot=2000)
    assert math.isclose(one.estimate, a.mean() - b[0].mean())
    # the interval widens with the seed-to-seed spread that a fixed image set hides
    shifted = a.astype(float) + np.array([[0.2], [-0.2], [0.1], [-0.1]])
    assert np.diff(seeds_images_bootstrap(shifted, b, n_boot=2000).ci) > np.diff(r.ci)
    with pytest.raises(ConfigError, match="same seeds and images"):
        seeds_images_bootstrap(a, b[:2])


def _tiny():
    torch.manual_seed(0)
    return create_model("tiny_cnn").eval()


def test_evaluation_outcomes_match_the_reported_accuracies():
    from clat.data.loader import load_bundled

    _, _, x, y = load_bundled()
    x, y, m = x[:16], y[:16], _tiny()
    res, oc = evaluate_outcomes(m, x, y, ThreatModel(steps=2), restarts=3, seed=0)
    assert list(oc) == ["clean", "pgd/run0", "pgd/run1", "pgd/run2", "pgd"]
    assert oc["clean"].float().mean().item() == res["clean_acc"] and oc["pgd"].float().mean().item() == res["pgd_acc"]
    assert [oc[f"pgd/run{r}"].float().mean().item() for r in range(3)] == res["pgd_acc_per_restart"]
    assert torch.equal(oc["pgd"], oc["pgd/run0"] & oc["pgd/run1"] & oc["pgd/run2"])
    r = run_protocol(m, x, y, EvalProtocol(ThreatModel(steps=2), restarts=2, apgd_ce=True), index_offset=100)
    rec = r.record(data="bundled", split="test")
    assert rec.indices.tolist() == list(range(100, 116)) and rec.meta["protocol"] == r.to_dict()["protocol"]
    assert set(rec.outcomes) == {"clean", "pgd/run0", "pgd/run1", "pgd", "apgd-ce"}
    assert rec.acc("apgd-ce") == r.apgd_ce_acc and rec.acc("pgd") == r.pgd_acc


def test_apgd_ce_stage_record_equals_its_verdict():
    from clat.data.loader import load_bundled

    _, _, x, y = load_bundled()
    res, oc = autoattack_outcomes(_tiny(), x[:8], y[:8], ThreatModel(eps=2 / 255), version="apgd-ce", device="cpu")
    assert torch.equal(oc["aa/apgd-ce"], oc["aa"]) and res["stage_record_mismatch"] == 0
    assert oc["aa"].float().mean().item() == res["robust_acc"]


def test_autoattack_stages_must_be_a_prefix_of_the_version():
    from clat.data.loader import load_bundled

    _, _, x, y = load_bundled()
    with pytest.raises(ConfigError, match="first attacks of AutoAttack standard"):
        autoattack_outcomes(_tiny(), x[:4], y[:4], version="standard", attacks=["apgd-t"])
    with pytest.raises(ConfigError, match="set autoattack"):
        EvalProtocol(autoattack_stages=("apgd-ce",))


@pytest.mark.slow
def test_standard_autoattack_stage_records_and_screening_agree_image_by_image():
    """The stage records are read off the library's own run, and a screening run of the first two stages gives exactly the
    standard run's state after APGD-T."""
    from clat.data.loader import load_bundled

    _, _, x, y = load_bundled()
    m = _tiny()
    x = x[:12]
    with torch.no_grad():
        y = m(x.float() / 255).argmax(1)  # every image starts correct
    threat = ThreatModel(eps=0.5 / 255)  # small enough that some images survive each stage
    res, oc = autoattack_outcomes(m, x, y, threat, version="standard", batch_size=5, device="cpu")
    stages = [oc[f"aa/{a}"] for a in res["attacks"]]
    assert res["stage_record_mismatch"] == 0 and torch.equal(stages[-1], oc["aa"])
    for before, after in zip([oc["aa/clean"], *stages], stages):  # cumulative: an image once fooled stays fooled
        assert not (after & ~before).any()
    for a, s in zip(res["attacks"], stages):  # the library's logged accuracy after each stage
        assert round(s.float().mean().item(), 4) == round(res["robust_acc_after"][a], 4)
    scr, oc2 = autoattack_outcomes(m, x, y, threat, version="standard", batch_size=5, device="cpu", attacks=["apgd-ce", "apgd-t"])
    assert scr["attacks"] == ["apgd-ce", "apgd-t"] and torch.equal(oc2["aa"], oc["aa/apgd-t"])


def test_clat_eval_writes_records_beside_its_json(tmp_path, capsys):
    from clat.runs.checkpoint import save_weights
    from clat.cli.main import main

    save_weights(tmp_path / "m.safetensors", _tiny(), {"model": "tiny_cnn", "num_classes": 10})
    out = tmp_path / "e" / "eval.json"
    assert main(["-q", "eval", str(tmp_path / "m.safetensors"), "--n-examples", "6", "--steps", "1", "--restarts", "2",
                 "--apgd-ce", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rec = load_record(out.parent / res["records"])
    assert res["records"] == "eval.records.npz" and rec.n == 6 and rec.meta["split"] == "test"
    assert rec.acc("clean") == res["clean_acc"] and rec.acc("pgd") == res["pgd_acc"] and rec.acc("apgd-ce") == res["apgd_ce"]["robust_acc"]
    # the images are the random subset --n-examples drew (with --seed), by their index in the test split
    assert len(set(rec.indices.tolist())) == 6 and rec.indices.max() < 1000
