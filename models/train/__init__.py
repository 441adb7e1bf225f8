"""The three training stages of Self-Forcing, scaled down (one module per stage).

    teacher       a bidirectional flow-matching model on clips of the training horizon
    student       a causal few-step student: AR diffusion with teacher forcing, then
                  causal ODE regression on trajectories of that AR model
    self_forcing  self-rollout through the pattern's cache + DMD (teacher = real score,
                  an online fake score)

`common.py` holds what every stage shares: the run folder, resumable checkpoints, the
data, per-sample randomness, gradient averaging across processes, logs, curves, GIFs.
"""
