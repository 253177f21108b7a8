-- Admissions: parse times, flag malformed rows, attach demographics.
-- Inputs (views made by recipes.py over the CSV.gz files, times still VARCHAR): src_admissions,
-- src_patients. Outputs: adm (one row per usable admission), attrition rows for the inputs.

CREATE OR REPLACE TABLE adm_parsed AS
SELECT
    subject_id,
    hadm_id,
    TRY_CAST(admittime AS TIMESTAMP) AS admittime,
    TRY_CAST(dischtime AS TIMESTAMP) AS dischtime,
    TRY_CAST(deathtime AS TIMESTAMP) AS deathtime,
    TRY_CAST(edregtime AS TIMESTAMP) AS edregtime,
    hospital_expire_flag,
    admission_type, admission_location, insurance, language, marital_status, race,
    (subject_id IS NULL OR hadm_id IS NULL) AS bad_id,
    (TRY_CAST(admittime AS TIMESTAMP) IS NULL) AS bad_admittime,
    -- a non-empty time that does not parse is an error in the file, not "unknown"
    (dischtime IS NOT NULL AND TRY_CAST(dischtime AS TIMESTAMP) IS NULL)
        OR (deathtime IS NOT NULL AND TRY_CAST(deathtime AS TIMESTAMP) IS NULL)
        OR (edregtime IS NOT NULL AND TRY_CAST(edregtime AS TIMESTAMP) IS NULL) AS bad_other_time,
    count(*) OVER (PARTITION BY hadm_id) > 1 AS dup_hadm
FROM src_admissions;

-- One patients row per subject (duplicates are reported and the first by anchor_year kept).
CREATE OR REPLACE TABLE pat AS
SELECT subject_id, gender, anchor_age, anchor_year, n_rows
FROM (
    SELECT *, count(*) OVER (PARTITION BY subject_id) AS n_rows,
        row_number() OVER (PARTITION BY subject_id ORDER BY anchor_year, anchor_age) AS rn
    FROM src_patients WHERE subject_id IS NOT NULL
) WHERE rn = 1;

INSERT INTO attrition
SELECT 'input', 1, 'hosp/patients', n, n - n_ok, n_ok,
    printf('%d rows without subject_id; %d duplicate rows of a subject_id', n_noid, n_dup)
FROM (SELECT (SELECT count(*) FROM src_patients) AS n,
             (SELECT count(*) FROM pat) AS n_ok,
             (SELECT count(*) FROM src_patients WHERE subject_id IS NULL) AS n_noid,
             (SELECT coalesce(sum(n_rows - 1), 0) FROM pat) AS n_dup);

CREATE OR REPLACE TABLE adm AS
SELECT
    a.subject_id, a.hadm_id, a.admittime, a.dischtime, a.deathtime, a.edregtime,
    a.hospital_expire_flag,
    -- labs without hadm_id are linked by time from the ED registration (or admission) on
    least(a.admittime, coalesce(a.edregtime, a.admittime)) AS win_start,
    p.anchor_age + (year(a.admittime) - p.anchor_year) AS age,
    p.gender AS sex,
    a.admission_type, a.admission_location, a.insurance, a.language, a.marital_status, a.race,
    p.subject_id IS NULL AS no_patient_row
FROM adm_parsed a
LEFT JOIN pat p ON p.subject_id = a.subject_id
WHERE NOT (a.bad_id OR a.bad_admittime OR a.bad_other_time OR a.dup_hadm);

INSERT INTO attrition
SELECT 'input', 2, 'hosp/admissions', count(*),
    count(*) FILTER (WHERE bad_id OR bad_admittime OR bad_other_time OR dup_hadm),
    count(*) FILTER (WHERE NOT (bad_id OR bad_admittime OR bad_other_time OR dup_hadm)),
    printf('malformed rows: %d missing subject_id/hadm_id; %d missing or unparsable admittime; '
           '%d unparsable dischtime/deathtime/edregtime; %d rows sharing a hadm_id; '
           '(kept, demographics unknown: %d admissions whose subject is not in hosp/patients)',
        count(*) FILTER (WHERE bad_id), count(*) FILTER (WHERE bad_admittime),
        count(*) FILTER (WHERE bad_other_time), count(*) FILTER (WHERE dup_hadm),
        (SELECT count(*) FROM adm WHERE no_patient_row))
FROM adm_parsed;
