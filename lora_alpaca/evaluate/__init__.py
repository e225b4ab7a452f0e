"""`evaluate.py`: answers for an evaluation set, blind human comparison, judge comparison,
and the report, in AlpacaEval's file format (`[{instruction, output, generator, dataset}]`)."""
