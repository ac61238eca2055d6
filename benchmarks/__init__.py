"""Speed baselines that dynbatch is measured against."""
