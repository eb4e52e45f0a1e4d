// Lookalike in Orthanc Explorer: on a study's page, list the most similar other studies and write them as an SR.
$('#study').live('pagebeforecreate', function() {
  var list = $('<ul>').attr('id', 'lookalike-similar').attr('data-role', 'listview').attr('data-inset', 'true');
  var find = $('<a>').attr('data-role', 'button').attr('href', '#').attr('data-icon', 'search')
    .text('Similar studies (Lookalike)');
  var report = $('<a>').attr('data-role', 'button').attr('href', '#').attr('data-icon', 'plus')
    .text('Similar studies as SR (Lookalike)');
  var anchor = $('#study-delete').parent().parent();
  find.insertBefore(anchor);
  report.insertBefore(anchor);
  list.insertBefore(anchor);

  function studyId() { return $.mobile.pageData ? $.mobile.pageData.uuid : null; }
  function failure(xhr) {
    var msg = xhr.status + ' ' + xhr.statusText;
    try { var b = JSON.parse(xhr.responseText); msg = b.error + (b.reason ? ': ' + b.reason : ''); } catch (e) {}
    list.empty().append($('<li>').text('Lookalike: ' + msg)).listview('refresh');
  }

  find.click(function(e) {
    e.preventDefault();
    if (!studyId()) return;
    $.ajax({ url: '../lookalike/studies/' + studyId() + '/similar?limit=10', dataType: 'json', cache: false,
      success: function(r) {
        list.empty().append($('<li>').attr('data-role', 'list-divider').text('Most similar studies'));
        if (r.similar.length == 0) list.append($('<li>').text('No other indexed study yet.'));
        $.each(r.similar, function(i, s) {
          var a = $('<a>').attr('href', '#study?uuid=' + s.orthanc_study_id)
            .text('#' + s.rank + ' ' + s.study_date + ' ' + s.patient_id)
            .attr('title', s.modality + ' study ' + s.study_instance_uid + ', patient ' + s.patient_id);
          a.append($('<span>').addClass('ui-li-count').text(s.score.toFixed(4)));
          list.append($('<li>').append(a));
        });
        list.listview('refresh');
      }, error: failure });
  });

  report.click(function(e) {
    e.preventDefault();
    if (!studyId()) return;
    $.ajax({ url: '../lookalike/studies/' + studyId() + '/similar-report', type: 'POST', dataType: 'json',
      success: function(r) { window.location.href = 'explorer.html#instance?uuid=' + r.report; }, error: failure });
  });
});
