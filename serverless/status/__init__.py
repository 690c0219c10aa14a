"""The status log on the shared disk: one file per task attempt, read by any instance."""
