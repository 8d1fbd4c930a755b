"""DeepSpeed resume reads its checkpoint with torch's weights_only unpickler: a real ZeRO-2 checkpoint loads,
a planted pickle in the checkpoint folder is refused in one line and runs nothing. One rank on gloo, in a
subprocess (a process group must not leak into the test session)."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, sys, torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    import deepspeed
    from yworld.model.errors import WeightsError
    from yworld.orchestrator.strategy import _deepspeed_loads_weights_only

    def engine():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
                  "steps_per_print": 10**9}
        return deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)[0]

    folder = sys.argv[1]
    trained = engine()
    trained.backward(trained(torch.randn(2, 4)).sum())
    trained.step()
    trained.save_checkpoint(os.path.join(folder, "deepspeed"), tag="state", save_latest=False)

    fresh = engine()
    with _deepspeed_loads_weights_only(fresh, folder):
        path, _ = fresh.load_checkpoint(os.path.join(folder, "deepspeed"), tag="state")
    assert path is not None and fresh.global_steps == 1
    for a, b in zip(trained.module.parameters(), fresh.module.parameters()):
        assert torch.equal(a, b)
    assert "load" not in vars(fresh.checkpoint_engine)  # the weights_only reader is gone again

    class RunsShell:
        def __reduce__(self):
            return os.system, ("touch " + os.path.join(folder, "pwned"),)

    torch.save({"optimizer_state_dict": RunsShell()},
               os.path.join(folder, "deepspeed", "state", "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    try:
        planted = engine()
        with _deepspeed_loads_weights_only(planted, folder):
            planted.load_checkpoint(os.path.join(folder, "deepspeed"), tag="state")
    except WeightsError as e:
        print("REFUSED", e)
    assert not os.path.exists(os.path.join(folder, "pwned"))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_resume_loads_real_state_and_refuses_a_planted_pickle(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(_free_port())], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    refused = [line for line in out.stdout.splitlines() if line.startswith("REFUSED ")]
    assert len(refused) == 1, out.stdout[-2000:]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt is refused" in refused[0] and "posix.system" in refused[0]
    assert not (tmp_path / "pwned").exists()
