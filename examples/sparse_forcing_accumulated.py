# A pattern file for `--pattern`: the sparse-forcing preset with a score that accumulates a
# block's importance over its life (decay 0.95 a step) instead of the last clean pass's alone.
import sparsedsl as sd
from sparsedsl.update import Update, importance, previous

base = sd.presets.get("sparse-forcing", capacity=16, window_frames=6, fraction=0.25)
pattern = sd.Pattern(base.layout, sink=base.sink, persistent=base.persistent, window=base.window,
                     current=base.current, update=Update(score=importance + 0.95 * previous),
                     name="sparse-forcing-accumulated")
