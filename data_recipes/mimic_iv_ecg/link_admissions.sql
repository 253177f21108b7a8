-- Link each ECG to the MIMIC-IV admission it belongs to.
-- Inputs (views the caller creates): ecgs (subject_id, study_id, ecg_time) and
--   admissions (MIMIC-IV hosp/admissions.csv.gz, all columns as text).
-- Rule: same subject_id and admittime - 1 day <= ecg_time <= dischtime (the day before admission catches
-- ECGs taken in the emergency department before the admission was opened). When several admissions
-- qualify, prefer one that contains the ECG, then the one whose admittime is closest to the ECG.
-- ECGs matching no admission (outpatient, or in a gap between stays) get no row: hadm_id stays NULL.
SELECT e.study_id, CAST(a.hadm_id AS BIGINT) AS hadm_id
FROM ecgs e
JOIN admissions a
  ON CAST(a.subject_id AS BIGINT) = e.subject_id
 AND e.ecg_time >= CAST(a.admittime AS TIMESTAMP) - INTERVAL 1 DAY
 AND e.ecg_time <= CAST(a.dischtime AS TIMESTAMP)
QUALIFY row_number() OVER (
  PARTITION BY e.study_id
  ORDER BY (e.ecg_time < CAST(a.admittime AS TIMESTAMP)),
           abs(epoch(e.ecg_time) - epoch(CAST(a.admittime AS TIMESTAMP))),
           CAST(a.hadm_id AS BIGINT)
) = 1
