"""What runs write and print: CSV and console tables, plots, the console, statistics."""
