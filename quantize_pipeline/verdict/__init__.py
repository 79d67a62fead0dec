"""The gate stage and what it reports: rules, statistics, sequential rounds, the report (record.py: Report, Rule,
RuleState, Verdict; report.json), plots, JUnit, MLflow."""
