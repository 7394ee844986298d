"""What a run leaves behind: model folders, saved atomically and loaded safely, and the reports and plots."""
