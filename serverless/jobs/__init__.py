"""Jobs: the frozen spec a caller asked for, the pipeline that runs it, its event feed and
progress, and the registry that owns every running job."""
