-- Comorbidities: Charlson groups from ICD-9 and ICD-10 diagnosis codes, by prefix.
-- Inputs: src_diagnoses_icd, adm, task_windows, charlson_map (icd_version, prefix, grp; from features.py).
-- Diagnosis codes are assigned at discharge, so an admission's codes are known only once it has been
-- discharged: a window uses the codes of the subject's admissions that started no later than the index
-- and were discharged at or before t_pred. For readmission_30d (t_pred = dischtime) that includes the
-- index admission's own codes; for critical_24h (t_pred = admittime + 24 h) only earlier admissions.

CREATE OR REPLACE TABLE dx AS
SELECT d.subject_id, d.hadm_id, upper(trim(d.icd_code)) AS icd_code, d.icd_version,
    a.hadm_id IS NULL AS unknown_hadm,
    (d.icd_code IS NULL OR d.icd_version NOT IN (9, 10) OR d.icd_version IS NULL) AS bad_code
FROM src_diagnoses_icd d
LEFT JOIN adm a ON a.hadm_id = d.hadm_id;

INSERT INTO attrition
SELECT 'input', 4, 'hosp/diagnoses_icd', count(*),
    count(*) FILTER (WHERE unknown_hadm OR bad_code),
    count(*) FILTER (WHERE NOT (unknown_hadm OR bad_code)),
    printf('%d hadm_id not among the usable admissions; %d missing icd_code or icd_version not 9/10',
        count(*) FILTER (WHERE unknown_hadm), count(*) FILTER (WHERE bad_code AND NOT unknown_hadm))
FROM dx;

-- Prefix join as three equi-joins (prefix lengths 3, 4, 5) instead of a LIKE scan.
CREATE OR REPLACE TABLE dx_groups AS
SELECT DISTINCT u.hadm_id, m.grp
FROM (
    SELECT hadm_id, icd_version,
        unnest([left(icd_code, 3), left(icd_code, 4), left(icd_code, 5)]) AS prefix
    FROM dx WHERE NOT (unknown_hadm OR bad_code)
) u
JOIN charlson_map m ON m.icd_version = u.icd_version AND m.prefix = u.prefix;

CREATE OR REPLACE TABLE dx_counts AS
SELECT hadm_id, count(*) AS n FROM dx WHERE NOT (unknown_hadm OR bad_code) GROUP BY hadm_id;

CREATE OR REPLACE TABLE dx_known AS
SELECT w.task, w.hadm_id, p.hadm_id AS src_hadm
FROM task_windows w
JOIN adm p ON p.subject_id = w.subject_id
WHERE p.admittime <= w.admittime AND p.dischtime <= w.t_pred;

CREATE OR REPLACE TABLE dx_feats AS
WITH flags AS (
    SELECT w.task, w.hadm_id,
    {{dx_pivot}}
    FROM task_windows w
    LEFT JOIN dx_known k ON k.task = w.task AND k.hadm_id = w.hadm_id
    LEFT JOIN dx_groups g ON g.hadm_id = k.src_hadm
    GROUP BY w.task, w.hadm_id
), counts AS (
    SELECT k.task, k.hadm_id, sum(c.n) AS n_diagnoses
    FROM dx_known k JOIN dx_counts c ON c.hadm_id = k.src_hadm
    GROUP BY k.task, k.hadm_id
)
SELECT f.*, {{charlson_index}} AS charlson_index, coalesce(c.n_diagnoses, 0) AS n_diagnoses
FROM flags f
LEFT JOIN counts c ON c.task = f.task AND c.hadm_id = f.hadm_id;
