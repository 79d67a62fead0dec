"""The calibrate, quantize, freeze and export stages: in memory, streaming layer by layer, and data-free shard by shard, all through AMD Quark."""
