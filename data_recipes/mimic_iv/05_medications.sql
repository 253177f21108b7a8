-- Medication-class flags from prescriptions.drug (patterns: features.MEDICATION_CLASSES).
-- Inputs: src_prescriptions, adm, task_windows, med_patterns (cls, include, exclude). Output: med_feats.
-- A prescription counts when it is linked to the admission by hadm_id and starts at or before t_pred.

CREATE OR REPLACE TABLE rx AS
SELECT r.hadm_id, TRY_CAST(r.starttime AS TIMESTAMP) AS starttime, lower(trim(r.drug)) AS drug,
    a.hadm_id IS NULL AS unknown_hadm,
    TRY_CAST(r.starttime AS TIMESTAMP) IS NULL AS bad_time
FROM src_prescriptions r
LEFT JOIN adm a ON a.hadm_id = r.hadm_id;

INSERT INTO attrition
SELECT 'input', 6, 'hosp/prescriptions', count(*),
    count(*) FILTER (WHERE unknown_hadm OR bad_time),
    count(*) FILTER (WHERE NOT (unknown_hadm OR bad_time)),
    printf('%d hadm_id not among the usable admissions; %d missing or unparsable starttime',
        count(*) FILTER (WHERE unknown_hadm), count(*) FILTER (WHERE bad_time AND NOT unknown_hadm))
FROM rx;

-- Classify the distinct names once (thousands) rather than every prescription row (millions).
CREATE OR REPLACE TABLE drug_classes AS
SELECT d.drug, p.cls
FROM (SELECT DISTINCT drug FROM rx WHERE drug IS NOT NULL) d
JOIN med_patterns p ON regexp_matches(d.drug, p.include)
    AND NOT (p.exclude <> '' AND regexp_matches(d.drug, p.exclude));

-- Reduce to distinct (window, drug) and (window, class) pairs before pivoting: prescriptions are many.
CREATE OR REPLACE TABLE med_feats AS
WITH given AS (
    SELECT DISTINCT w.task, w.hadm_id, r.drug
    FROM task_windows w
    JOIN rx r ON r.hadm_id = w.hadm_id AND r.starttime <= w.t_pred
    WHERE r.drug IS NOT NULL
), classes AS (
    SELECT DISTINCT g.task, g.hadm_id, c.cls FROM given g JOIN drug_classes c ON c.drug = g.drug
), counts AS (
    SELECT task, hadm_id, count(*) AS n_distinct_drugs FROM given GROUP BY task, hadm_id
)
SELECT w.task, w.hadm_id,
    {{med_pivot}},
    coalesce(any_value(n.n_distinct_drugs), 0) AS n_distinct_drugs
FROM task_windows w
LEFT JOIN classes c ON c.task = w.task AND c.hadm_id = w.hadm_id
LEFT JOIN counts n ON n.task = w.task AND n.hadm_id = w.hadm_id
GROUP BY w.task, w.hadm_id;
