"""The memory runtime: what a rollout keeps between AR steps, and how it changes.

Owns the rollout cache (rollout_cache.py: pools, tables, commit, save / load), one layer's
state (layer.py), pool sizes and the per-step plan (cache_plan.py), the commit on the GPU
(triton_commit.py), the generated update rule (update_rule.py, its Jinja2 template in
templates/update.py.jinja) and snapshots of the memory with their picture
(memory_picture.py). Inside the room a module imports only those before it in: cache_plan,
layer, update_rule, memory_picture, triton_commit, rollout_cache.

May import: `sparsedsl`, `codegen.attention` (the block tables, the kernel cache's files),
`codegen.select` (representatives, importance), `codegen._templates` (rendering). Never
`codegen.program` or `codegen.check`: the program is handed in (`RolloutCache(program,
...)`) and makes caches (`program.new_cache`); it imports this room, not the other way
round.
"""
