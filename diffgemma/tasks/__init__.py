"""Tasks built on the model: sudoku, ..."""
