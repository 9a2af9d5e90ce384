"""The owner's state behind one small interface (see ``base``)."""
