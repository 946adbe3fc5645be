"""The sequence operators: retention (`retention`), the selective scan (`scan`), SSD (`ssd`), the causal conv.

Each op keeps a readable form of its formula beside the fast ones, which are tested against it in float64."""
