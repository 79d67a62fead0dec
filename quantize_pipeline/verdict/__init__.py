"""The gate stage and what it reports: rules, statistics, sequential rounds, the report, plots, JUnit, MLflow."""
