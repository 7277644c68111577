"""What flows in and out of a judge: pairs read from files within bounds (``reading``, ``pairs``), the
frozen results of steps and judgments (``results``), seeded splits, teacher files, and output files
written whole or not at all (``output``). It imports nothing of the library but its top-level modules."""
