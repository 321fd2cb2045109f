"""unbackdoor.core.distributed: the pure sharding rules in-process, the collectives in a real 2-process job."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from unbackdoor.core import distributed as D
from unbackdoor.lm.large_models import large_model_kwargs
from unbackdoor.core.errors import ConfigError, DataError

from .conftest import HERE, run_job, torchrun_cmd


# ---- pure rules, one process ------------------------------------------------------------------------

@given(n=st.integers(0, 60), world=st.integers(1, 8), seed=st.integers(0, 5), epoch=st.integers(0, 3),
       shuffle=st.booleans(), drop_last=st.booleans())
@settings(max_examples=80, deadline=None)
def test_shard_indices_matches_torch_distributed_sampler(n, world, seed, epoch, shuffle, drop_last):
    from torch.utils.data.distributed import DistributedSampler

    data = list(range(n))
    for r in range(world):
        sampler = DistributedSampler(data, num_replicas=world, rank=r, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last)
        sampler.set_epoch(epoch)
        assert D.shard_indices(n, r, world, shuffle=shuffle, seed=seed, epoch=epoch, drop_last=drop_last) == \
            list(sampler)


@given(n=st.integers(1, 300), world=st.integers(1, 9))
def test_shard_indices_cover_every_sample_once_besides_padding(n, world):
    parts = [D.shard_indices(n, r, world) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # equal length: every rank runs the same number of steps
    flat = [i for p in parts for i in p]
    assert set(flat) == set(range(n))
    assert len(flat) - n == (-n) % world  # only the wrap-around padding repeats


@given(n=st.integers(0, 200), world=st.integers(1, 9))
def test_batch_shards_tile_the_global_batch_in_order(n, world):
    slices = [D.batch_shard(n, r, world) for r in range(world)]
    assert [i for s in slices for i in range(n)[s]] == list(range(n))
    sizes = [s.stop - s.start for s in slices]
    assert max(sizes) - min(sizes) <= 1


@given(n=st.integers(0, 50), world=st.integers(1, 6))
def test_round_robin_deals_every_item_once(n, world):
    dealt = sorted(i for r in range(world) for i in D.round_robin(n, r, world))
    assert dealt == list(range(n))


def test_bad_rank_or_world_is_a_config_error():
    with pytest.raises(ConfigError, match="rank 2 is not in 0..1"):
        D.batch_shard(10, 2, 2)
    with pytest.raises(ConfigError):
        D.shard_indices(10, 0, 0)
    with pytest.raises(DataError):
        D.loss_weight(0, 0, 2)


def test_loss_weight_makes_averaged_shard_gradients_equal_the_global_batch_gradient():
    """The identity DataParallel relies on, checked without processes: uneven shards plus a per-batch penalty."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    x, y = torch.randn(11, 5), torch.randint(0, 3, (11,))

    def loss(xb, yb):
        return F.cross_entropy(lin(xb), yb) + 0.7 * lin.weight.pow(2).sum()

    ref = torch.autograd.grad(loss(x, y), lin.weight)[0]
    world = 3
    total = torch.zeros_like(ref)
    for r in range(world):
        sl = D.batch_shard(11, r, world)
        g = torch.autograd.grad(loss(x[sl], y[sl]) * D.loss_weight(sl.stop - sl.start, 11, world), lin.weight)[0]
        total += g / world  # what DDP's all-reduce average does
    assert torch.allclose(total, ref, atol=1e-6)


def test_single_process_helpers_are_the_identity(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert D.info() == D.DistInfo(0, 1, 0, None)
    assert D.init().world_size == 1 and not D.is_distributed()
    assert D.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert D.global_accuracy(3, 4) == 0.75
    assert D.gather_objects({"a": 1}) == [{"a": 1}]
    assert D.distributed_map(lambda v: v * 2, [1, 2, 3]) == [2, 4, 6]
    assert D.on_main_process(lambda: (tmp_path / "f").write_text("x")) == 1
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    with D.DataParallel(model) as dp:
        assert dp.module is model and not dp.active
        x, y = torch.ones(4, 1, 2, 2), torch.zeros(4)
        assert dp.shard(x, y)[0] is x and dp.weight(4, 4) == 1.0
    assert D.convert_sync_batchnorm(model) is model  # nothing to synchronise with


def test_launcher_environment_is_read_when_no_group_exists(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    i = D.info()
    assert (i.rank, i.world_size, i.local_rank, i.is_main) == (3, 4, 1, False)
    assert D.launched()
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        D.info()


def test_cpu_env_tells_accelerate_to_use_cpu_only_when_launched_without_gpu(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.cpu_env() is False and "ACCELERATE_USE_CPU" not in __import__("os").environ
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.cpu_env() is True
    assert __import__("os").environ["ACCELERATE_USE_CPU"] == "true"
    monkeypatch.setenv("ACCELERATE_USE_CPU", "false")  # the user's explicit choice is kept
    assert D.cpu_env() is False


def test_trainer_that_would_train_each_process_alone_is_refused(monkeypatch):
    class Args:
        world_size = 1
        parallel_mode = "not_parallel"

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="each process would train alone"):
        D.check_trainer_distributed(Args())
    Args.world_size = 2
    D.check_trainer_distributed(Args())
    monkeypatch.setenv("WORLD_SIZE", "1")
    Args.world_size = 1
    D.check_trainer_distributed(Args())


def test_revert_sync_batchnorm_restores_classes_and_shares_parameters():
    model = nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    weight = model[1].weight
    swapped = D._swap_bn(model, lambda bn: D.GlooSyncBatchNorm(**D._bn_args(bn)), D._BN_KINDS)
    assert isinstance(swapped[1], D.GlooSyncBatchNorm) and swapped[1].weight is weight
    D.revert_sync_batchnorm(model, {"1": nn.BatchNorm1d, "3": nn.BatchNorm2d})
    assert type(model[1]) is nn.BatchNorm1d and type(model[3]) is nn.BatchNorm2d
    assert model[1].weight is weight  # an optimizer holding the parameter keeps training the model


def test_gloo_sync_batchnorm_without_group_is_plain_batchnorm():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(3)
    mine = D.GlooSyncBatchNorm(3)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 5, 5) * 3 + 2
    assert torch.allclose(ref(x), mine(x))
    assert torch.allclose(ref.running_var, mine.running_var) and int(mine.num_batches_tracked) == 1
    ref.eval(), mine.eval()
    assert torch.allclose(ref(x), mine(x))


def test_free_port_is_bindable():
    import socket

    from .conftest import free_port

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# ---- collectives in a real 2-process gloo job (torchrun) ------------------------------------------

@pytest.fixture(scope="module")
def two_process_checks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("mp")
    run_job(torchrun_cmd(HERE / "mp_checks.py", str(out)), timeout=120, what="torchrun of mp_checks.py")
    return json.loads((out / "checks.json").read_text())


@pytest.mark.multiproc
def test_two_process_group_is_gloo_on_cpu(two_process_checks):
    assert two_process_checks["info"] == [0, 2, "gloo"]


@pytest.mark.multiproc
@pytest.mark.parametrize("case", ["step_even_syncbn", "step_uneven_syncbn"])
def test_data_parallel_step_with_sync_batchnorm_equals_the_single_process_step(two_process_checks, case):
    r = two_process_checks[case]
    # tolerance: float32 rounding of a different summation order (the gradients are ~0.3)
    assert r["grad_max_abs_diff"] < 1e-5, r
    assert r["buffer_max_abs_diff"] < 1e-5, r  # running mean/var (unbiased global variance), batches tracked
    assert abs(r["mean_loss"] - r["ref_loss"]) < 1e-5
    assert r["classes_inside"] == ["GlooSyncBatchNorm"] and r["classes_after"] == ["BatchNorm2d"]
    assert r["global_count"] == (8 if case == "step_even_syncbn" else 7)


@pytest.mark.multiproc
def test_per_rank_batchnorm_would_not_match_which_is_why_it_is_synchronised(two_process_checks):
    r = two_process_checks["step_even_local_bn"]
    assert r["grad_max_abs_diff"] > 1e-3, r  # per-rank statistics of 4 samples: a different gradient


@pytest.mark.multiproc
def test_two_process_sharding_gather_and_global_accuracy(two_process_checks):
    r = two_process_checks["sharding"]
    assert r["shard_parts"] == [D.shard_indices(11, k, 2, shuffle=True, seed=3, epoch=1) for k in range(2)]
    assert r["batch_parts"] == [list(range(6)), list(range(6, 11))]
    assert r["mapped"] == [[i, i % 2] for i in range(7)]  # input order kept, items dealt round-robin
    assert r["global_acc"] == pytest.approx(4 / 10)  # (3 + 1) / (4 + 6), not either rank's own accuracy
    assert r["sum"] == [2.0, 1.0]


@pytest.mark.multiproc
def test_only_the_main_process_writes_and_the_others_see_it(two_process_checks):
    r = two_process_checks["writes"]
    assert r["seen_by_all"] == ["rank 0\n", "rank 0\n"]
    assert r["first"] == "main\nother\n"
    assert r["errors"][0] == "disk full"
    assert "main process failed while writing" in r["errors"][1] and "disk full" in r["errors"][1]


@pytest.mark.multiproc
def test_a_failure_on_one_rank_stops_every_rank_of_a_distributed_map(two_process_checks):
    seen = two_process_checks["map_failure"]
    assert seen[1] == "ValueError: bad item 3"
    assert seen[0].startswith("UnbackdoorError") and "bad item 3" in seen[0]


# ---- large-model loading arguments -----------------------------------------------------------------

def test_large_model_kwargs_default_to_bf16_and_one_gpu_per_process(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert large_model_kwargs() == {"dtype": torch.bfloat16}  # no GPU: placement is left to the caller
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert large_model_kwargs(dtype="fp16")["device_map"] == {"": 3}


def test_quantized_base_weights_without_gpu_or_bitsandbytes_is_a_clear_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="need a CUDA GPU"):
        large_model_kwargs(quantize="4bit")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="bitsandbytes package") as e:
        large_model_kwargs(quantize="8bit")
    assert "pip install bitsandbytes" in str(e.value)
    with pytest.raises(ConfigError, match="'8bit' or '4bit'"):
        large_model_kwargs(quantize="3bit")


def test_device_map_auto_is_refused_under_a_multi_process_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ConfigError, match="each would claim every GPU"):
        large_model_kwargs(device_map="auto")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert large_model_kwargs(device_map="auto")["device_map"] == "auto"
    with pytest.raises(ConfigError):
        large_model_kwargs(dtype="int4")


def test_auto_device_under_a_gpu_launch_is_this_process_gpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.process_device(cpu) == cpu  # one process: the caller's choice stands
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert D.process_device(cpu) == torch.device("cuda", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.process_device(cpu) == cpu


@pytest.mark.multiproc
def test_fit_with_a_rank_that_gets_no_sample_of_the_last_batch_matches_one_process(two_process_checks):
    from .mp_checks import fit_with_a_one_sample_last_batch

    one = fit_with_a_one_sample_last_batch()  # this (single) process
    two = two_process_checks["fit_tail"]
    assert [s[2] for s in two["steps"]] == [16, 17, 16, 17]  # global counts, also on the 1-sample step
    for a, b in zip(one["steps"], two["steps"]):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert two["weight_sum"] == pytest.approx(one["weight_sum"], rel=1e-5)
    assert two["classes"] == one["classes"] == ["BatchNorm2d"]
