-- MIMIC-IV-ECG: one row per ECG with its machine report.
-- Inputs (views the caller creates over the CSV files, all columns as text):
--   record_list           record_list.csv           subject_id, study_id, file_name, ecg_time, path
--   machine_measurements  machine_measurements.csv  subject_id, study_id, cart_id, ecg_time, report_0..17, ...
-- report = the non-empty machine statements report_0 ... report_17 in order, joined with '; '
-- (NULL when the study has no machine_measurements row). 29999 means "not measured" in the interval
-- columns and becomes NULL. A study_id listed twice keeps its first row (counted in ecg_attrition.csv).
SELECT
  CAST(r.subject_id AS BIGINT) AS subject_id,
  CAST(r.study_id AS BIGINT) AS study_id,
  trim(r.path) AS path,
  TRY_CAST(r.ecg_time AS TIMESTAMP) AS ecg_time,
  NULLIF(concat_ws('; ',
    NULLIF(trim(m.report_0), ''),
    NULLIF(trim(m.report_1), ''),
    NULLIF(trim(m.report_2), ''),
    NULLIF(trim(m.report_3), ''),
    NULLIF(trim(m.report_4), ''),
    NULLIF(trim(m.report_5), ''),
    NULLIF(trim(m.report_6), ''),
    NULLIF(trim(m.report_7), ''),
    NULLIF(trim(m.report_8), ''),
    NULLIF(trim(m.report_9), ''),
    NULLIF(trim(m.report_10), ''),
    NULLIF(trim(m.report_11), ''),
    NULLIF(trim(m.report_12), ''),
    NULLIF(trim(m.report_13), ''),
    NULLIF(trim(m.report_14), ''),
    NULLIF(trim(m.report_15), ''),
    NULLIF(trim(m.report_16), ''),
    NULLIF(trim(m.report_17), '')
  ), '') AS report,
  NULLIF(TRY_CAST(m.rr_interval AS INTEGER), 29999) AS rr_interval,
  CASE WHEN TRY_CAST(m.qrs_end AS INTEGER) < 29999 AND TRY_CAST(m.qrs_onset AS INTEGER) < 29999
       THEN TRY_CAST(m.qrs_end AS INTEGER) - TRY_CAST(m.qrs_onset AS INTEGER) END AS qrs_duration,
  NULLIF(TRY_CAST(m.qrs_axis AS INTEGER), 29999) AS qrs_axis
FROM record_list r
LEFT JOIN machine_measurements m ON CAST(m.study_id AS BIGINT) = CAST(r.study_id AS BIGINT)
QUALIFY row_number() OVER (PARTITION BY CAST(r.study_id AS BIGINT) ORDER BY r.path) = 1
ORDER BY subject_id, ecg_time, study_id
