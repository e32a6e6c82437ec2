"""`from esen_train.calculator import ESENCalculator`: the ASE calculator's public import path.

The calculator lives with the rest of the evaluation code in esen_train/evaluation/calculator.py.
"""
from esen_train.evaluation.calculator import ESENCalculator

__all__ = ["ESENCalculator"]
