"""Ray's fake multi-node provider, with spot preemption the test can trigger.

The autoscaler runs in its own process (the head's monitor), so a test cannot call the provider it holds. This
provider watches a folder instead (`provider.preempt_dir` in the cluster config): a file named after a node
id makes it terminate that node (the fake provider's own `terminate_node`: the node's raylet, agents and
workers end) the next time the autoscaler lists the nodes, and the node is gone from that list at once, as a
reclaimed spot instance is from a cloud's. The file is renamed `<node id>.done` when that happened.

Loaded by the autoscaler as `provider: {type: external, module: preemptible_provider.PreemptibleFakeProvider}`
with this folder on the head's PYTHONPATH (tests/orchestrator/cluster/test_autoscaling.py).
"""
from __future__ import annotations

import os

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class PreemptibleFakeProvider(FakeMultiNodeProvider):
    def non_terminated_nodes(self, tag_filters):
        folder = self.provider_config.get("preempt_dir")
        if folder and os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                if name.endswith(".done"):
                    continue
                if name in self._nodes:
                    self.terminate_node(name)
                os.rename(os.path.join(folder, name), os.path.join(folder, f"{name}.done"))
        return super().non_terminated_nodes(tag_filters)
