"""Model families: one folder per family (configuration + modeling), the DenseSSM pieces in ``dense``."""
