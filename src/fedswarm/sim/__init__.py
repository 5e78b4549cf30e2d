"""Local multi-process simulation: launcher, fault schedule, report and plots."""
