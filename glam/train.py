"""`glam-train`: train one GLaM model (dense or MoE) and log it to MLflow.

    glam-train model=cpu_dense train.steps=200
    glam-train -m model=cpu_dense,cpu_moe          # Hydra multirun, one MLflow run each
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import hydra
import jax
import numpy as np
from flax import nnx
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from glam import accounting
from glam.config import CONF_DIR, Config, register_configs, to_config
from glam.data import MarkovCorpus
from glam.model import GLaM
from glam.optim import lr_schedule, make_optimizer
from glam.step import make_eval_step, make_train_step
from glam.tracking import Tracker

log = logging.getLogger("glam.train")

register_configs()


def evaluate(eval_step, model_state, corpus: MarkovCorpus, cfg: Config):
    """Validation loss and perplexity, and each MoE layer's mean expert load on the val split."""
    nll, n, loads, batches = 0.0, 0.0, {}, 0
    for batch in corpus.val_batches(cfg.train.eval_batches, cfg.train.batch_size,
                                    cfg.model.seq_len + 1):
        batch_nll, batch_n, batch_loads = jax.device_get(eval_step(model_state, batch))
        nll, n, batches = nll + float(batch_nll), n + float(batch_n), batches + 1
        for layer, load in batch_loads.items():
            loads[layer] = loads.get(layer, 0.0) + np.asarray(load)
    loss = nll / max(n, 1.0)
    expert_load = {f"layer{k}": (v / batches).tolist() for k, v in loads.items()}
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}, expert_load


def run(cfg: Config, output_dir: str | Path, resolved: DictConfig | None = None) -> dict:
    """Train per `cfg`, log to MLflow, write artifacts under `output_dir`; return final metrics."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = resolved if resolved is not None else OmegaConf.structured(cfg)
    config_path = output_dir / "config.yaml"
    config_path.write_text(OmegaConf.to_yaml(resolved, resolve=True))

    m, t = cfg.model, cfg.train
    counts = accounting.count(m)
    tokens_per_step = t.batch_size * m.seq_len
    corpus = MarkovCorpus(cfg.data)

    model = GLaM(m, rngs=nnx.Rngs(t.seed))
    schedule = lr_schedule(cfg.schedule, t.steps)
    optimizer = nnx.Optimizer(model, make_optimizer(cfg.optimizer, schedule), wrt=nnx.Param)
    model_graphdef, _ = nnx.split(model)
    graphdef, state = nnx.split((model, optimizer))
    train_step = make_train_step(graphdef, m, schedule)
    eval_step = make_eval_step(model_graphdef)
    base_key = jax.random.key(t.seed + 1)

    params = {**OmegaConf.to_container(resolved, resolve=True), "counts": counts.as_dict()}
    tags = {"model": m.name, "family": m.family, "n_experts": m.n_experts,
            "activated_params": counts.activated_params,
            "forward_flops_per_token": counts.forward_flops_per_token,
            "output_dir": str(output_dir)}
    lg = cfg.logger
    with Tracker(lg.tracking_uri, lg.experiment, lg.run_name or m.name, params, tags) as tracker:
        log.info("MLflow run %s (%s): %s params, %s activated, %.3g forward FLOPs/token",
                 tracker.run_id, m.family, f"{counts.total_params:,}",
                 f"{counts.activated_params:,}", counts.forward_flops_per_token)
        pending: list[tuple[int, dict]] = []
        bar = tqdm(total=t.steps, disable=not t.progress, unit="step", dynamic_ncols=True)
        start = mark = time.perf_counter()
        mark_step = 0
        for step in range(t.steps):
            batch = corpus.train_batch(step, t.batch_size, m.seq_len + 1, t.seed)
            state, metrics = train_step(state, batch, jax.random.fold_in(base_key, step))
            pending.append((step, metrics))
            if step == 0:
                jax.block_until_ready(metrics)
                mark, mark_step = time.perf_counter(), 1  # throughput excludes compilation
                compile_s = mark - start
            if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
                loss = float(metrics["lm_loss"])
                now = time.perf_counter()
                rate = (step + 1 - mark_step) * tokens_per_step / max(now - mark, 1e-9)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
            bar.update(1)
            if len(pending) >= lg.flush_every or step + 1 == t.steps:
                for s, values in jax.device_get(pending):
                    # Compute spent before the loss of step s was measured: s updates.
                    tracker.log_metrics(s, {**values, "train_flops": s * tokens_per_step
                                            * counts.train_flops_per_token})
                tracker.flush()
                pending.clear()
        bar.close()
        train_s = time.perf_counter() - mark
        model_state = nnx.state(nnx.merge(graphdef, state)[0])
        val_metrics, expert_load = evaluate(eval_step, model_state, corpus, cfg)
        final = {
            **val_metrics,
            "final_lm_loss": float(metrics["lm_loss"]),
            "tokens_per_second": (t.steps - 1) * tokens_per_step / max(train_s, 1e-9),
            "compile_seconds": compile_s,
            "train_seconds": train_s,
            "train_tokens": t.steps * tokens_per_step,
            "train_flops_total": t.steps * tokens_per_step * counts.train_flops_per_token,
            "data_entropy_nats": corpus.entropy_nats,
        }
        tracker.log_metrics(t.steps, final)
        routing_path = output_dir / "expert_load.json"
        routing_path.write_text(json.dumps(expert_load, indent=1))
        for path in (config_path, routing_path):
            tracker.log_artifact(path)
        final["run_id"] = tracker.run_id
    log.info("done: val_loss %.4f (data entropy %.4f), %.0f tokens/s",
             final["val_loss"], corpus.entropy_nats, final["tokens_per_second"])
    return final


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(dcfg: DictConfig) -> float:
    cfg = to_config(dcfg)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
    final = run(cfg, HydraConfig.get().runtime.output_dir, dcfg)
    return final["val_loss"]


if __name__ == "__main__":
    main()
