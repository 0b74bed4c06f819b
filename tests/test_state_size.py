"""benchmarks/state_size.py at smoke size: the bytes it reports are the bytes the strategies hold."""

from __future__ import annotations

import pytest

from tests.test_benchmarks import _load as load_benchmark

pytest.importorskip("peft")


def _load():
    return load_benchmark("state_size")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("state_size") / "state_size.json"
    return _load().main(["--configs", "ewc,ewc_bf16", "--rows-per-task", "8", "--seq-len", "2",
                         "--bf16-error-width", "0", "--output", str(out)]), out


def test_ewc_is_8_bytes_per_parameter_and_4_in_bf16(report):
    rows = {(r["config"], r["setup"]): r for r in report[0]["rows"]}
    for setup in ("full", "lora"):
        ewc = rows[("ewc", setup)]
        # Online EWC: one fp32 Fisher + one fp32 anchor, live and in the checkpoint; nothing per row.
        assert ewc["live_between_per_param"] == pytest.approx(8.0, abs=1e-9)
        assert ewc["live_between_fixed"] == pytest.approx(0.0, abs=1e-6)
        assert ewc["persisted_between_per_param"] == pytest.approx(8.0, abs=0.05)  # + safetensors header
        assert rows[("ewc_bf16", setup)]["live_between_per_param"] == pytest.approx(4.0, abs=1e-9)
    assert report[1].is_file()


def test_with_lora_the_state_covers_only_the_trainable_parameters(report):
    for record in report[0]["records"]:
        if record["config"] == "ewc" and record["setup"] == "lora":
            assert record["trainable"] < record["base_total"] / 10  # LoRA: a small share of the model
            assert record["live_between"] == 8 * record["trainable"]


def test_llama_7b_counts_and_projection(report):
    data = report[0]
    counts = data["llama2_7b_trainable"]
    assert counts["full"] == 6_738_415_616  # Llama-2-7B's parameter count
    # LoRA r=16 on q_proj and v_proj (4096 -> 4096) of 32 blocks: A (16 x 4096) + B (4096 x 16) each.
    assert counts["lora_r16_qv"] == 32 * 2 * 16 * (4096 + 4096)
    ewc = next(p for p in data["projection"] if p["config"] == "ewc" and p["setup"] == "full")
    assert ewc["GiB_per_gpu_full"] == pytest.approx(8 * counts["full"] / 8 / 2**30)


def test_penalty_timing_covers_every_state_dtype():
    timing = _load().ewc_penalty_time("tiny", repeats=6)
    assert set(timing) == {"float32", "bfloat16_fisher", "bfloat16"} and all(ms > 0 for ms in timing.values())
