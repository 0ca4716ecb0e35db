"""Retrain an uploaded `.keras` audio classifier (or a fresh small CNN) on a CSV `audio,label` data set."""
