"""GPT-2 shared by the sharder, the native node and the reference checks: config, checkpoint, stage math.

Import the submodules directly (config has no torch dependency): `services.common.gpt2.config`,
`services.common.gpt2.checkpoint`, `services.common.gpt2.model`.
"""
