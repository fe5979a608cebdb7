"""Graph passes (instrument / materialize pairs). The compression passes land here."""
