"""Update ops: deferred, re-runnable, collected; apply_updates; the never-run warnings."""

import warnings

import numpy as np
import pytest

import fastbn as fb
from fastbn import _ops


def _x(seed=0, shape=(8, 3)):
    return (np.random.RandomState(seed).randn(*shape) * 2 + 1).astype(np.float32)


def test_ops_do_nothing_until_run_and_run_again_as_tf():
    x = _x()
    fb.batch_norm(x, decay=0.5, scope="bn")
    mean_op, var_op = fb.get_collection(fb.GraphKeys.UPDATE_OPS)
    moving_mean = fb.get_variables_by_name("moving_mean")[0]
    assert moving_mean.numpy().tolist() == [0, 0, 0]
    mean_op.run()
    once = moving_mean.numpy()
    np.testing.assert_allclose(once, 0.5 * x.mean(axis=0), rtol=1e-6)
    fb.run(mean_op)  # a TF op applies its update again each time it runs
    np.testing.assert_allclose(moving_mean.numpy(), 0.75 * x.mean(axis=0), rtol=1e-6)
    assert mean_op.run_count == 2 and var_op.run_count == 0


def test_apply_updates_runs_and_removes():
    x = _x()
    fb.batch_norm(x, scope="bn")
    fb.add_to_collection(fb.GraphKeys.UPDATE_OPS, "not an op")
    assert fb.apply_updates() == 2
    assert fb.get_collection(fb.GraphKeys.UPDATE_OPS) == ["not an op"]
    assert fb.apply_updates() == 0


def test_apply_updates_custom_collection_and_graph():
    g = fb.Graph()
    with g.as_default():
        fb.batch_norm(_x(), updates_collections=["mine", "also"], scope="bn")
    assert fb.apply_updates("mine", graph=g) == 2
    assert len(g.get_collection("also")) == 2  # the same ops, still listed there


def test_inplace_updates_during_the_call():
    x = _x()
    fb.batch_norm(x, decay=0.0, updates_collections=None)
    np.testing.assert_allclose(fb.get_variables_by_name("moving_mean")[0].numpy(),
                               x.mean(axis=0), rtol=1e-6)


def test_renorm_shared_dependency_runs_once_per_run():
    x = _x(shape=(8, 4, 3))
    fb.batch_norm(x, renorm=True, renorm_decay=0.5, scope="bn")
    ops = fb.get_collection(fb.GraphKeys.UPDATE_OPS)
    assert len(ops) == 2 and ops[0].deps == ops[1].deps
    renorm_mean = fb.get_variables_by_name("renorm_mean")[0]
    batch_mean = x.reshape(-1, 3).mean(axis=0)
    fb.run(ops)  # both ops, one run: the renorm update happens once
    np.testing.assert_allclose(renorm_mean.numpy(), 0.5 * batch_mean, rtol=1e-5)
    ops[0].run()  # a separate run: it happens again
    np.testing.assert_allclose(renorm_mean.numpy(), 0.75 * batch_mean, rtol=1e-5)


def test_run_rejects_non_ops():
    with pytest.raises(TypeError, match="fetches"):
        fb.run("op")
    with pytest.raises(TypeError, match="fetches"):
        fb.run([None])


def test_is_training_variable_is_read_when_the_op_runs():
    x = _x()
    flag = fb.Variable(True, trainable=False)
    fb.batch_norm(x, is_training=flag, decay=0.0, scope="bn")
    flag.assign(False)
    fb.apply_updates()
    moving_mean = fb.get_variables_by_name("moving_mean")[0]
    assert moving_mean.numpy().tolist() == [0, 0, 0]
    fb.batch_norm(x, is_training=flag, decay=0.0, scope="bn", reuse=True)
    flag.assign(True)
    fb.apply_updates()  # statistics of the call, applied because it reads True now
    np.testing.assert_allclose(moving_mean.numpy(), x.mean(axis=0), rtol=1e-6)


def test_in_place_layer_not_training_now_skips_batch_statistics(monkeypatch):
    """With updates_collections=None nothing can apply later, so a call whose is_training
    Variable reads False computes no batch statistics for it; a collecting call does."""
    from fastbn import layers
    x = _x(shape=(6, 2, 2, 3))
    flag = fb.Variable(False, trainable=False)
    calls = []
    real = layers._bessel_corrected_moments
    monkeypatch.setattr(layers, "_bessel_corrected_moments",
                        lambda *a: calls.append(1) or real(*a))
    fb.batch_norm(x, is_training=flag, updates_collections=None, scope="a")
    assert calls == []
    fb.batch_norm(x, is_training=flag, updates_collections=["mine"], scope="b")
    assert calls == [1]


@pytest.mark.parametrize("updates_collections", [None, ["mine"]])
def test_zero_debias_shadows_exist_whatever_is_training_reads(updates_collections):
    """TF builds the zero-debiased update, and so its shadow variables, with the layer,
    whether or not the is_training Variable reads True at the time."""
    flag = fb.Variable(False, trainable=False)
    fb.batch_norm(_x(), is_training=flag, zero_debias_moving_mean=True,
                  updates_collections=updates_collections, scope="bn")
    names = {v.op_name for v in fb.global_variables()}
    # (TF's names: the shadow scope is the variable's full name, opened inside "bn".)
    assert {"bn/bn/moving_mean/biased", "bn/bn/moving_mean/local_step"} <= names


def test_warns_when_evaluating_stale_statistics():
    x = _x()
    fb.batch_norm(x, scope="bn")
    with pytest.warns(fb.UpdateOpsWarning, match=r"apply_updates\(\)"):
        fb.batch_norm(x, scope="bn", reuse=True, is_training=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fb.batch_norm(x, scope="bn", reuse=True, is_training=False)  # warned once


def test_no_stale_warning_once_updates_have_run():
    x = _x()
    fb.batch_norm(x, scope="bn")
    fb.apply_updates()
    fb.batch_norm(x, scope="bn", reuse=True)  # pending again, but the user runs updates
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fb.batch_norm(x, scope="bn", reuse=True, is_training=False)


def test_warns_when_update_ops_pile_up(monkeypatch):
    monkeypatch.setattr(_ops, "PENDING_UPDATE_OPS_LIMIT", 10)
    x = _x()
    with pytest.warns(fb.UpdateOpsWarning, match="never run") as record:
        for _ in range(8):
            fb.batch_norm(x, scope="bn", reuse=fb.AUTO_REUSE)
    assert len(record) == 1
    assert record[0].filename == __file__  # points at the caller, not into fastbn
    fb.apply_updates()
    assert fb.get_default_graph()._unrun_update_ops == 0


def test_no_pile_up_warning_when_updates_run(monkeypatch):
    monkeypatch.setattr(_ops, "PENDING_UPDATE_OPS_LIMIT", 10)
    x = _x()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(20):
            fb.batch_norm(x, scope="bn", reuse=fb.AUTO_REUSE)
            fb.apply_updates()
