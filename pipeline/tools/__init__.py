"""Looking at runs and graphs: inspect, compare, ops."""
