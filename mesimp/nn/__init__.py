"""meProp layers: dense forward, top-k backward, per-unit counters (Linear, Conv2d, LSTM),
and ``meprop_``, the in-place swap that puts them into any model."""
