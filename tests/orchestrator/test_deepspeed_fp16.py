"""DeepSpeed fp16 (torch_autocast + ZeRO-1/2) trains: the loss scale is dynamic (it drops from 2**16 on the first
overflows, then steps apply), the reported gradient norm is unscaled, the loss goes down, BatchNorm stays fp32,
and the scale survives a save / load. Through the real DeepSpeedStrategy, 2 ranks on gloo (fp16 gradients
reduced and partitioned across them), in a subprocess (a process group must not leak into the test session)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import json, os, sys, torch
    from torch import nn
    from torch import multiprocessing

    STEPS, CLIP, WORLD = 16, 10.0, 2
    torch.manual_seed(0)
    images, labels = torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU(),
                             nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def loss_of(model, rank, micro):
        # a per-image sum times a factor, as our detection loss is scaled: at a scale of 2**16 its fp16
        # gradients overflow, so the scale has to come down before a step applies
        first = (2 * rank + micro) * 4
        x, y = images[first:first + 4], labels[first:first + 4]
        return nn.functional.cross_entropy(model(x).float(), y, reduction="sum") * 5.0

    def worker(rank, folder, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(WORLD),
                          LOCAL_RANK=str(rank))
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
        from yworld.orchestrator.strategy import StrategyConfig, make_strategy, plan_accumulation

        def strategy(stage):
            model = net()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            cfg = StrategyConfig(kind="deepspeed", precision="fp16", zero_stage=stage)
            return make_strategy(cfg, model, optimizer, plan_accumulation(16, WORLD, 4), grad_clip=CLIP)

        def adam_steps(s):
            return sorted({int(v["step"]) for v in s.optimizer.optimizer.state.values()})

        out = {}
        for stage in (1, 2):
            s = strategy(stage)
            losses, norms, scales = [], [], []
            for step in range(STEPS):
                total = 0.0
                for micro in range(2):
                    with s.micro_step(micro == 1):
                        with s.autocast():
                            loss = loss_of(s.model, rank, micro)
                        s.backward(loss)
                    total += loss.item()
                norms.append(s.step().item())
                losses.append(total)
                scales.append(s.optimizer.loss_scale)
            checkpoint = os.path.join(folder, f"zero{stage}")
            os.makedirs(checkpoint, exist_ok=True)
            s.save(checkpoint, rank=rank)
            fresh = strategy(stage)
            fresh.load(checkpoint)
            bn = [b for m in s.module.modules() if isinstance(m, nn.BatchNorm2d)
                  for b in (m.weight, m.running_mean, m.running_var)]
            out[f"zero{stage}"] = {
                "scaler": type(s.optimizer.loss_scaler).__name__,
                "gradscaler": s.optimizer.torch_autocast_gradscaler is not None,
                "losses": losses, "norms": norms, "scales": scales, "adam_steps": adam_steps(s),
                "bn_fp32_finite": all(b.dtype == torch.float32 and bool(torch.isfinite(b).all()) for b in bn),
                "loaded": {"scaler": type(fresh.optimizer.loss_scaler).__name__,
                           "scale": fresh.optimizer.loss_scale, "adam_steps": adam_steps(fresh)}}
        if rank == 0:
            # the fp32 gradient norm at the initial weights: DeepSpeed averages the ranks' summed gradients
            reference = net()
            (sum(loss_of(reference, r, m) for r in range(WORLD) for m in range(2)) / WORLD).backward()
            grads = torch.stack([p.grad.norm() for p in reference.parameters()])
            out["fp32_norm"] = torch.linalg.vector_norm(grads).item()
            print("RESULT " + json.dumps(out), flush=True)
        torch.distributed.destroy_process_group()

    if __name__ == "__main__":
        multiprocessing.spawn(worker, args=(sys.argv[1], sys.argv[2]), nprocs=WORLD)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_fp16_scales_the_loss_dynamically_and_applies_its_steps(tmp_path):
    script = tmp_path / "fp16_steps.py"  # a file, not -c: the spawned ranks import it
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(tmp_path), str(_free_port())], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    out = json.loads(line[len("RESULT "):])
    for stage in ("zero1", "zero2"):
        run = out[stage]
        assert run["scaler"] == "DynamicLossScaler" and not run["gradscaler"]
        skipped = [i for i, n in enumerate(run["norms"]) if n == float("inf")]
        applied = [i for i, n in enumerate(run["norms"]) if n != float("inf")]
        # the first steps overflow at 2**16 and are skipped while the scale comes down; then every step applies
        assert skipped and skipped == list(range(len(skipped))) and len(applied) >= 8, run
        assert run["scales"][-1] < 2 ** 16 and len(set(run["scales"][len(skipped) - 1:])) == 1, run["scales"]
        assert run["adam_steps"] == [len(applied)]  # every applied step, and only those, stepped AdamW
        # a skipped step leaves the weights alone (the same batch gives the same loss) ...
        assert len(set(run["losses"][:applied[0] + 1])) == 1, run["losses"]
        # ... the norm reported on the first applied step is the UNSCALED one (the weights are still the initial ones)
        assert abs(run["norms"][applied[0]] - out["fp32_norm"]) < 0.01 * out["fp32_norm"], (run["norms"], out)
        learning = run["losses"][applied[0]:]  # and it learns: the loss falls at every applied step
        assert all(b < a for a, b in zip(learning, learning[1:])) and learning[-1] < 0.85 * learning[0], learning
        assert run["bn_fp32_finite"]
        assert run["loaded"] == {"scaler": "DynamicLossScaler", "scale": run["scales"][-1],
                                 "adam_steps": run["adam_steps"]}
