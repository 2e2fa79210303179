-- CGM readings are glucose in interstitial fluid: LOINC 99504-3 "Glucose [Mass/volume] in Interstitial fluid"
-- (the HL7 FHIR CGM implementation guide, STU 1), not 2339-0 "Glucose [Mass/volume] in Blood", which releases
-- before this one gave them (transforms/vocab.py CGM_LOINC). Recodes what was loaded that way, and what was
-- staged by the previous release and not yet loaded. Meter readings (41653-7, capillary blood) are unchanged.
UPDATE readings SET loinc = '99504-3'
WHERE metric = 'blood_glucose' AND source = 'cgm' AND loinc = '2339-0';

UPDATE stg_candidates SET loinc = '99504-3'
WHERE metric = 'blood_glucose' AND source = 'cgm' AND loinc = '2339-0';
