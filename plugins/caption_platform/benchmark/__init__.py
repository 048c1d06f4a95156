"""The per-Beam-SDK-version benchmark, its report and the "Captioning performance" page.

- :mod:`.steps`: what the benchmark DAG's tasks do (prepare, environments, plan/finish each
  run around the caption operator, report);
- :mod:`.versions`: which SDK versions, and the job's requirements for each;
- :mod:`.sdk_envs`: one virtual environment per version, built once and reused;
- :mod:`.version_stats`: per-version statistics and the regression rule;
- :mod:`.formatting`, :mod:`.charts`, :mod:`.pages`: text tables, PNG charts, HTML and CSV;
- :mod:`.page_app`: the UI page's app (the plugin file only registers it).
"""
