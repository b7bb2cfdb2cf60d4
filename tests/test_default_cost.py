"""PSD's cost in FLOPs (XLA's count, the same on every CPU): the memory teacher's step has CLIP's FLOPs, the EMA
teacher's adds a forward pass on the subset; and a memory bank that would outgrow the host is refused up front."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softalign.config import schema
from softalign.models import build_model
from softalign.objectives import memory_bank
from softalign.parallel import sharding
from softalign.training.optim import make_optimizer
from softalign.training.step import build_train_step, create_state

B = 32


def _step_flops(**psd) -> float:
    c = schema.demo_config()
    c.model.update(dtype="float32")
    c.model.text.update(vocab_size=64, eot_id=2)
    c.batch_size = B
    c.psd.update(psd)
    mesh = sharding.make_mesh(1)
    model = build_model(c.model)
    tx, lr = make_optimizer(c.optim, c.num_steps)
    fn, teacher, _ = build_train_step(c, model=model, mesh=mesh, tx=tx, lr_schedule=lr)
    size, ctx, dim = c.model.vision.image_size, c.model.text.context_length, c.model.embed_dim

    def init():
        params = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1, ctx), jnp.int32))
        return create_state(params["params"], tx, teacher, 0)

    batch = {"image": jax.ShapeDtypeStruct((B, size, size, 3), jnp.float32),
             "tokens": jax.ShapeDtypeStruct((B, ctx), jnp.int32), "index": jax.ShapeDtypeStruct((B,), jnp.int32)}
    if teacher.host_memory:
        batch.update({memory_bank.MEMORY_IMAGE: jax.ShapeDtypeStruct((B, dim), jnp.float32),
                      memory_bank.MEMORY_TEXT: jax.ShapeDtypeStruct((B, dim), jnp.float32),
                      memory_bank.MEMORY_SEEN: jax.ShapeDtypeStruct((B,), jnp.bool_)})
    cost = jax.jit(fn).lower(jax.eval_shape(init), batch).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_memory_teacher_adds_no_forward_pass_and_ema_adds_one():
    assert schema.base_config().psd.alpha_max > 0, "the default is PSD, not plain CLIP"
    clip = _step_flops(alpha_max=0.0, teacher="self")
    memory = _step_flops(teacher="memory")
    ema = _step_flops(teacher="ema", subset_fraction=0.5)
    assert memory <= 1.02 * clip, memory / clip
    assert 1.05 * clip < ema < 1.3 * clip, ema / clip  # a forward pass on rho*B rows, no backward


def test_memory_bank_that_would_not_fit_is_refused():
    memory_bank.check_fits(20_000, 128, "float32", ram=2**30)  # 20 MiB of 1 GiB: fine
    with pytest.raises(MemoryError, match="psd.memory_dtype='float16'"):
        memory_bank.check_fits(12_000_000, 512, "float32", ram=64 * 2**30)  # CC12M at D=512: 46 GiB
    memory_bank.check_fits(12_000_000, 512, "float16", ram=256 * 2**30)
    assert memory_bank.bank_nbytes(10, 4, "float16") == 10 * (2 * 4 * 2 + 4)
    assert np.isfinite(memory_bank.host_ram_bytes())
